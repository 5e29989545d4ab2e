"""INT8 calibration (frames -> scales, Q/DQ graphs, accuracy reports)."""
