"""Rewards as pure functions: the losses, the reward shift, the objectives over them, the figures and the
calibration of p_up. Imports qbco.data and qbco.common; never a model."""
