"""A finished run as files for other tools: the merged model and its fidelity check."""
