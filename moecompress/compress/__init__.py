"""Joint compression: expert pruning and mixed-precision quantisation under one size budget.

The one stage that composes two others: it scores experts with `moecompress.prune`'s scorers
and quantises the kept ones with `moecompress.quant`, so it sits above both in the import
layers (`compress -> prune, quant`).
"""
