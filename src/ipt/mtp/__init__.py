"""Multi-token prediction: extra heads on a causal LM (`heads`), their memory-efficient loss
(`loss`), and self-speculative decoding with them (`decode`)."""
