"""Value profiles: an organisation's principles as data (profile), compiled to training and evaluation
sets (compile, teacher), and adherence scoring as the `values` kind of `plural eval` (evaluate, report)."""
