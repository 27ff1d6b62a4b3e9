"""Record tooling for train_gpt.py logs: parse (runlog), package (make_record), validate (check_record), plot (plot_logs).

Nothing in this package is imported by the trainer, so none of it counts towards the 16,000,000-byte artifact.
"""
