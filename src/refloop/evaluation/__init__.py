"""Evaluation apart from training: self-consistency (Pr@0.5), REC accuracy, REG and caption metrics."""
