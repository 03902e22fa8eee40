"""Product-key memory ops: key search and the weighted bag of value rows."""

from kernels.pkm.ref import pkm_brute_force_ref, pkm_lookup_ref, pkm_select, pkm_topk_ref

__all__ = ["pkm_brute_force_ref", "pkm_lookup_ref", "pkm_select", "pkm_topk_ref"]
