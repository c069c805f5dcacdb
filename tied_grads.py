"""Tied weights under back-prop: sum a tensor's two gradients in place (an FO-baseline detail).

OPT's and RoBERTa's input embedding is also their LM head: one tensor θ read by two modules, so
back-prop produces two gradients for it, g_head and g_emb, and θ.grad = g_head + g_emb. Autograd
adds them out of place (a new buffer for the sum while both parts are alive): three
embedding-sized buffers at the peak, where two suffice. At OPT-13B in fp32 that is ~1 GiB of the
FO baseline's peak, and Tab. 5's FO row (Σ_l max{|a_l|, |x_l|}) counts no such buffer.

The fix, used by optimizers.BackProp only: the second module to read θ in a forward gets an alias
(same storage, no copy, a leaf of its own). When the alias's gradient is complete, a hook moves
it into θ.grad, and autograd then adds θ's own gradient in place. Same sum, bit for bit.
ZO never back-propagates and needs none of this; a student may skip this file.
"""
import rge


def in_place(params):
    """Within the block, modules after the first to run with a trainable tensor read an alias.

    The alias is made once per tensor and step (so autocast casts it once) and never for a frozen
    tensor; only reads inside the owning modules' forwards are aliased (as in rge.swapped). Its
    gradient (the head's, which arrives first) is moved into θ.grad, taken as is while θ.grad is
    None, else added in place; a module run twice sums its reads of the alias as usual.
    """
    aliases, first = {}, set()

    def move(theta, alias):
        if theta.grad is None:
            theta.grad = alias.grad
        else:
            theta.grad.add_(alias.grad)
        alias.grad = None

    def replace(p, i):
        if i not in first or not p.requires_grad:
            first.add(i)
            return p
        if i not in aliases:
            aliases[i] = p.detach().requires_grad_()
            aliases[i].register_post_accumulate_grad_hook(lambda a, theta=p: move(theta, a))
        return aliases[i]

    return rge.swapped(params, replace)
