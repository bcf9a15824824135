"""SNR analysis: the statistic, what is measured, the recorder, rules from SNR, plots, and the auto-SNR mode."""
