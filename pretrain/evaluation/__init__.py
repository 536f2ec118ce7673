"""Evaluation after (and during) training: top-1/top-5 on labelled shards, and the k-NN monitor."""
