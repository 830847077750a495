"""Condensing MoE layers into dense MLPs (CD-MoE, arXiv 2412.00069): construction, search, writing."""
