"""The §5 variants of ZO fine-tuning: block-wise, hybrid ZO-FO and sparse directions.

They change which tensors one estimate covers and how u is drawn, never the update rule, so they
are options of every ZO optimizer in optimizers.py, assembled here as torch param groups:

- Block-wise ZO (Tab. 6). The RGE variance grows with the dimension d (E‖ĝ‖² ≈ (d+2)‖∇f‖², App.
  A), so estimating one block at a time lowers it: one estimate (2q forwards) per block, with
  independent directions per block (the released code reuses one u for every block). Blocks are
  the embeddings, each transformer layer, and the final norm/head: p = 26 for OPT-1.3B.
- Hybrid ZO-FO (Tab. 7). The first K layers (and the embeddings) by ZO, the rest by back-prop
  with the FO twin of the ZO optimizer. Back-prop then stops at layer K+1, so only the deep layers
  keep activations and the memory falls as K grows. K = 0 is all FO, K = n all ZO.
- Sparse ZO (Tab. 8). u ⊙ m with m ~ Bernoulli(1 − s_i) per entry of tensor i; s_i from one
  global magnitude threshold of the pretrained weights (rge.sparsity_ratios), masks redrawn every
  `mask_every` steps (rge.Mask).

References: Zhang et al. 2024, arXiv:2402.11592, §5, Tab. 6–8. Not here: the update rules
(optimizers.py), the estimate and the masks (rge.py), the layer list (models.py).
"""
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

import models
import optimizers
import rge

FO_PARTNER = {"zo_sgd": "fo_sgd", "zo_adam": "fo_adam"}    # --zo_layers: the back-prop half


# ---- blocks -------------------------------------------------------------------------------------

def _runs_before_layers(model) -> list[torch.nn.Module]:
    """The modules that run before the first transformer layer in a one-token forward."""
    stack, ran = models.layers(model), []
    hook = register_module_forward_pre_hook(lambda module, args: ran.append(module))
    try:
        device = model.get_input_embeddings().weight.device
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        hook.remove()
    return ran[:ran.index(stack[0])]


@torch.no_grad()
def blocks(model, params) -> list[tuple[int, list]]:
    """`params` by block (§5), as (key, tensors): −1 the embeddings, j layer j, n the norm/head.

    A tensor outside the layers joins the embeddings if its module runs before layer 0 in a
    one-token forward, else the head. Registration order cannot tell (OPT registers its final norm
    before its layers), and the hybrid split must get the embeddings right, or back-prop would run
    down to them. A tied head stays with the embeddings. Blocks without a trainable tensor are
    dropped: OPT-1.3B has 26 (both embeddings in one, 24 layers, final norm; the released code
    counts 27, with the two embeddings apart); with LoRA a block is its layer's adapters.
    """
    stack = models.layers(model)
    key = {id(p): j for j, layer in enumerate(stack) for p in layer.parameters()}
    for module in _runs_before_layers(model):
        for p in module.parameters(recurse=False):
            key.setdefault(id(p), -1)
    head = len(stack)
    parts = {}
    for p in params:
        parts.setdefault(key.get(id(p), head), []).append(p)
    return sorted(parts.items())


def tuned_by_zo(key: int, zo_layers: int, num_layers: int) -> bool:
    """In the hybrid with K = zo_layers, is block `key` (−1 embeddings, j layer j, n head) ZO's?"""
    if zo_layers == 0:                 # Tab. 7's ends: K = 0 leaves even the embeddings to FO,
        return False
    if zo_layers == num_layers:        # and K = n gives ZO the head too
        return True
    return key < zo_layers             # the embeddings and layers 0 … K−1


# ---- the hybrid ---------------------------------------------------------------------------------

class Hybrid:
    """Hybrid ZO-FO (§5, Tab. 7): ZO on the embeddings and first K layers, back-prop on the rest.

    The ZO tensors have requires_grad False, so autograd records nothing before the first FO
    tensor: back-prop stops at layer K+1 and only layers K+1…n keep activations. One step
    (Gauss–Seidel over the two parts, like block-wise ZO): 1) the FO step: one forward at θ_t,
    whose loss is the step's loss, backward, update of the deep tensors, whose gradients are then
    freed; 2) the ZO step of the shallow tensors, 2q forwards at the updated deep tensors.
    FO first, so the logged loss is the unperturbed f(θ_t), as in a pure FO run.
    """

    def __init__(self, zo, fo):
        self.zo, self.fo = zo, fo
        self.param_groups = zo.param_groups + fo.param_groups   # the loop sets their lr

    def step(self, closure) -> float:
        loss = self.fo.step(closure)
        self.fo.zero_grad(set_to_none=True)  # spent: the ZO forwards need no deep-layer gradient
        self.zo.step(closure)
        self.forward_passes = self.fo.forward_passes + self.zo.forward_passes
        self.projected_grad = self.zo.projected_grad
        return loss


# ---- assembly -----------------------------------------------------------------------------------

def check(name: str, model=None, *, block=False, zo_layers=None, sparsity=0.0):
    """Raise ValueError, in one line, for a variant that optimizer `name` cannot run."""
    cls = optimizers.OPTIMIZERS[name]
    is_zo = issubclass(cls, optimizers.ZeroOrderOptimizer)
    if (block or zo_layers is not None or sparsity) and not is_zo:
        raise ValueError(f"--block, --zo_layers and --sparsity are options of the ZO optimizers, "
                         f"not of {name}")
    if zo_layers is not None and name not in FO_PARTNER:
        pairs = ", ".join(f"{z} + {f}" for z, f in FO_PARTNER.items())
        raise ValueError(f"--zo_layers pairs {pairs}; {name} has no first-order partner")
    if sparsity and issubclass(cls, optimizers.FwdGradSGD):
        raise ValueError(f"--sparsity masks RGE directions; {name} draws JVP tangents instead")
    if not 0 <= sparsity < 1:
        raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")
    if model is not None and zo_layers is not None:
        n = len(models.layers(model))
        if not 0 <= zo_layers <= n:
            raise ValueError(f"--zo_layers must be in 0..{n}, got {zo_layers}")


def build(name: str, model, params, hparams: dict, fo_hparams: dict | None = None, *,
          block=False, zo_layers=None, sparsity=0.0, mask_every=1, pretrained=True):
    """Optimizer `name` over `params` with constructor arguments `hparams`, and the variants,
    which combine: block-wise (a param group per block), hybrid (`zo_layers` = K: `name` on the
    embeddings and first K layers, FO_PARTNER[name] with `fo_hparams` on the rest) and sparse
    (ratios of the ZO tensors from their magnitudes, or, with `pretrained` False, e.g. fresh
    adapters whose magnitudes mean nothing yet, the ratio `sparsity` for every tensor: the
    released code's "layer" mode). A model is needed for blocks and the hybrid split only.
    """
    check(name, model, block=block, zo_layers=zo_layers, sparsity=sparsity)
    params = list(params)
    if not (block or zo_layers is not None or sparsity):
        return optimizers.OPTIMIZERS[name](params, **hparams)
    if block or zo_layers is not None:
        parts = blocks(model, params)
    else:
        parts = [(-1, params)]
    zo_parts, fo_params = [], []
    for key, ps in parts:
        if zo_layers is None or tuned_by_zo(key, zo_layers, len(models.layers(model))):
            zo_parts.append(ps)
        else:
            fo_params += ps
    if not block:                                   # one estimate over all the ZO tensors
        zo_parts = [[p for ps in zo_parts for p in ps]]
    groups = [{"params": ps} for ps in zo_parts if ps]
    if sparsity:
        zo_params = [p for g in groups for p in g["params"]]
        ratios = (rge.sparsity_ratios(zo_params, sparsity) if pretrained
                  else [sparsity] * len(zo_params))
        for g in groups:
            g["sparsity"], ratios = ratios[:len(g["params"])], ratios[len(g["params"]):]
            g["mask_every"] = mask_every
    if zo_layers is not None:                   # autograd then records nothing below layer K
        fo_ids = {id(p) for p in fo_params}
        for p in params:
            p.requires_grad_(id(p) in fo_ids)
    zo = optimizers.OPTIMIZERS[name](groups, **hparams) if groups else None
    if not fo_params:
        return zo
    if fo_hparams is None:
        raise TypeError("the hybrid (zo_layers) needs fo_hparams for its back-prop half")
    fo = optimizers.OPTIMIZERS[FO_PARTNER[name]](fo_params, **fo_hparams)
    return Hybrid(zo, fo) if zo else fo
