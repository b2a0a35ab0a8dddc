"""Whether to process a mail: already processed (identity) and the loop guard."""
