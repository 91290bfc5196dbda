"""What a finished run says and does: figures on feedback rows, answers, scores, task checks and plots."""
