"""The PR2 evolution predictor: module, feature cache, losses, optimizer grouping."""
