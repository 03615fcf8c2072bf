"""Beside the loop, never inside it: labelled data, feature extraction, the trainer and its evaluation."""
