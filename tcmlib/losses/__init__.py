"""Loss functions: TCM, Smooth-AP, the Recall@k surrogate, and a registry that adds TCM to any base loss."""
