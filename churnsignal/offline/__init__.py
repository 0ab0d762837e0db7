"""Offline replay and calibration: history readers, backtest, calibrate, synthetic histories."""
