"""The per-sample gradients of one parameter from one layer call, kept in factored form.

Each kind answers, for the per-sample gradients g_1 … g_B that it stands for (U = [g_i]):
    gram(other, diagonal)  UᵀU, or the cross-Gram Uᵀ U' with `other` of the same kind
    weighted_sum(c)        U c, c (B,) -> param shape, c (B, m) -> (m, *param shape)
    project(V)             Uᵀ V, V (m, *param shape) -> (B, m)
through the public ops, never materializing U unless the kind is `DenseFactors` (small parameters:
norm-layer affine parameters, biases, the torch.func fallback). Two contributions to one
parameter meet through `cross_gram`: the ops' cross-Gram for one kind, a token-pair formula
for a tied embedding and output layer, else one projected on the other's materialized
per-sample gradients; `sum_gram` sums a parameter's pairs. The public face of these is
`capture.Factors` (one per parameter, over all its calls).
"""
import torch

from .. import ops


def _common_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class LinearFactors:
    """g_i = Σ_t e_it a_itᵀ (d_out × d_in): A (B, T, d_in) inputs, E (B, T, d_out) output grads.
    transposed=True: the weight is stored (d_in × d_out) (transformers' Conv1D, y = x W + b),
    so g_i is the transpose; the Gram is the same."""

    def __init__(self, A, E, backend, transposed=False):
        dtype = _common_dtype(A, E)
        self.A, self.E, self.backend = A.to(dtype), E.to(dtype), backend
        self.transposed = transposed

    @property
    def batch_size(self):
        return self.A.shape[0]

    def can_merge(self, other):
        return isinstance(other, LinearFactors) and other.transposed == self.transposed

    def merge(self, other):
        """The calls' per-sample gradients add up: concatenate their tokens."""
        A = torch.cat([self.A, other.A.to(self.A.dtype)], dim=1)
        return LinearFactors(A, torch.cat([self.E, other.E.to(self.E.dtype)], dim=1),
                             self.backend, self.transposed)

    def _args(self):
        # T = 1 goes to the plain (B, d) form.
        if self.A.shape[1] == 1:
            return self.A[:, 0], self.E[:, 0]
        return self.A, self.E

    def can_cross(self, other):
        # gram_linear's cross-Gram takes two batches with the same token count
        return (isinstance(other, LinearFactors) and other.A.shape[1:] == self.A.shape[1:]
                and other.E.shape[-1] == self.E.shape[-1] and other.transposed == self.transposed)

    def gram(self, other=None, diagonal=False):
        A, E = self._args()
        A2, E2 = other._args() if other is not None else (None, None)
        return ops.gram_linear(A, E, False, A2=A2, E2=E2, diagonal=diagonal,
                               backend=self.backend)

    def weighted_sum(self, c):
        A, E = self._args()
        out = ops.weighted_sum_linear(A, E, c, False, backend=self.backend)[0]
        return out.transpose(-1, -2) if self.transposed else out

    def project(self, V):
        A, E = self._args()
        if self.transposed:  # V (m, d_in, d_out)
            V = V.transpose(-1, -2)
        return ops.project_linear(A, E, V, None, backend=self.backend)


class Conv2dFactors:
    """g_i = Σ_p e_ip patch_ip ᵀ of a 2-D convolution: X (B, C_in, H, W) inputs (already padded
    when the layer pads asymmetrically or not with zeros), E (B, C_out, H_out, W_out).
    Calls are not merged (their patches do not concatenate): several calls meet through
    cross-Grams."""

    def __init__(self, X, E, geometry, backend):
        dtype = _common_dtype(X, E)
        self.X, self.E, self.geometry, self.backend = X.to(dtype), E.to(dtype), geometry, backend

    @property
    def batch_size(self):
        return self.X.shape[0]

    def can_merge(self, other):
        return False

    def can_cross(self, other):
        # gram_conv2d's cross-Gram takes two batches of the same layer and image size
        return (isinstance(other, Conv2dFactors) and other.geometry == self.geometry
                and other.X.shape[1:] == self.X.shape[1:] and other.E.shape[1:] == self.E.shape[1:])

    def gram(self, other=None, diagonal=False):
        kw = {} if other is None else {"X2": other.X, "E2": other.E}
        return ops.gram_conv2d(self.X, self.E, *self.geometry, False, diagonal=diagonal,
                               backend=self.backend, **kw)

    def weighted_sum(self, c):
        return ops.weighted_sum_conv2d(self.X, self.E, c, *self.geometry, False,
                                       backend=self.backend)[0]

    def project(self, V):
        kernel_size, stride, padding, dilation, groups = self.geometry
        return ops.project_conv2d(self.X, self.E, V, None, kernel_size, stride, padding,
                                  dilation, groups, backend=self.backend)


class EmbeddingFactors:
    """g_i = Σ_t onehot(idx_it) e_itᵀ (num_embeddings × d): idx (B, T) int64, E (B, T, d)."""

    def __init__(self, idx, E, num_embeddings, padding_idx, backend):
        self.idx, self.E, self.backend = idx, E, backend
        self.num_embeddings, self.padding_idx = num_embeddings, padding_idx

    @property
    def batch_size(self):
        return self.idx.shape[0]

    def can_merge(self, other):
        return self.can_cross(other)

    def merge(self, other):
        return EmbeddingFactors(torch.cat([self.idx, other.idx], dim=1),
                         torch.cat([self.E, other.E.to(self.E.dtype)], dim=1),
                         self.num_embeddings, self.padding_idx, self.backend)

    def can_cross(self, other):
        return isinstance(other, EmbeddingFactors) and other.padding_idx == self.padding_idx

    def gram(self, other=None, diagonal=False):
        kw = {} if other is None else {"idx2": other.idx, "E2": other.E.to(self.E.dtype)}
        return ops.gram_embedding(self.idx, self.E, self.num_embeddings, self.padding_idx,
                                  diagonal=diagonal, backend=self.backend, **kw)

    def weighted_sum(self, c):
        return ops.weighted_sum_embedding(self.idx, self.E, c, self.num_embeddings,
                                          self.padding_idx, backend=self.backend)

    def project(self, V):
        return ops.project_embedding(self.idx, self.E, V, self.padding_idx, backend=self.backend)


class DenseFactors:
    """Materialized per-sample gradients G (B, *param shape), for small parameters."""

    def __init__(self, G):
        self.G = G

    @property
    def batch_size(self):
        return self.G.shape[0]

    def can_merge(self, other):
        return isinstance(other, DenseFactors)

    def merge(self, other):
        return DenseFactors(self.G + other.G.to(self.G.dtype))

    def can_cross(self, other):
        return isinstance(other, DenseFactors)

    def gram(self, other=None, diagonal=False):
        G = self.G.flatten(1)
        G2 = G if other is None else other.G.flatten(1).to(G.dtype)
        return (G * G2).sum(1) if diagonal else G @ G2.T

    def weighted_sum(self, c):
        C = c.to(self.G.dtype)
        G = self.G.flatten(1)
        out = (G.T @ C).T if C.dim() == 2 else G.T @ C
        return out.reshape(*C.shape[1:], *self.G.shape[1:])

    def project(self, V):
        return self.G.flatten(1) @ V.to(self.G.dtype).flatten(1).T


def materialize(contribution):
    """The per-sample gradients U as a (B, *param shape) tensor: U I (identity weights)."""
    if isinstance(contribution, DenseFactors):
        return contribution.G
    B = contribution.batch_size
    eye = torch.eye(B, dtype=torch.float64 if _dtype_of(contribution) == torch.float64
                    else torch.float32, device=_device_of(contribution))
    return contribution.weighted_sum(eye)


def _dtype_of(contribution):
    return contribution.G.dtype if isinstance(contribution, DenseFactors) else contribution.E.dtype


def _device_of(contribution):
    return (contribution.G if isinstance(contribution, DenseFactors) else contribution.E).device


# Largest (samples × tokens × samples × tokens) block of the tied embedding/linear cross term.
_PAIR_BLOCK = 1 << 24


def embedding_linear_cross(emb, lin, diagonal=False):
    """Uₑᵀ U_l for one weight W (N × d) used by an embedding (idx, E) and by a linear layer
    (A, E') computing A Wᵀ (tied input/output embeddings):
        K_ij = Σ_{t,s} [idx_it ≠ padding] (e_it · a_js) E'_js[idx_it],
    in blocks of samples i, without forming either side's per-sample gradients."""
    dtype = torch.float64 if torch.float64 in (emb.E.dtype, lin.E.dtype) else torch.float32
    E, A, logits = emb.E.to(dtype), lin.A.to(dtype), lin.E.to(dtype)
    idx = emb.idx
    B, T = idx.shape
    B2, T2 = A.shape[:2]
    keep = (torch.ones_like(idx, dtype=dtype) if emb.padding_idx is None
            else (idx != emb.padding_idx).to(dtype))
    if diagonal:
        dots = torch.einsum("itd,isd->its", E, A)
        picked = torch.gather(logits, 2, idx[:, None, :].expand(B, T2, T)).transpose(1, 2)
        return (dots * picked * keep[:, :, None]).sum((1, 2))
    K = E.new_empty((B, B2))
    step = max(1, _PAIR_BLOCK // max(1, T * B2 * T2))
    for lo in range(0, B, step):
        hi = min(lo + step, B)
        dots = torch.einsum("itd,jsd->itjs", E[lo:hi], A)
        # picked[i, t, j, s] = E'_js[idx_it]
        picked = logits[:, :, idx[lo:hi].reshape(-1)].unflatten(2, (hi - lo, T))
        picked = picked.permute(2, 3, 0, 1)
        K[lo:hi] = (dots * picked * keep[lo:hi, :, None, None]).sum((1, 3))
    return K


def cross_gram(a, b, diagonal=False):
    """Uₐᵀ U_b (B_a × B_b) for two contributions to one parameter (or its diagonal): the
    kinds' own cross-Gram when they share a kind, the tied embedding/linear formula, else
    one side projected on the other's materialized per-sample gradients (the dense side
    when there is one)."""
    if isinstance(a, EmbeddingFactors) and isinstance(b, LinearFactors) and not b.transposed:
        return embedding_linear_cross(a, b, diagonal)
    if isinstance(a, LinearFactors) and isinstance(b, EmbeddingFactors) and not a.transposed:
        K = embedding_linear_cross(b, a, diagonal)
        return K if diagonal else K.T
    if a.can_cross(b):
        if diagonal and isinstance(a, (LinearFactors, Conv2dFactors)):
            # the linear/conv ops' diagonal option is for a batch with itself only: the
            # diagonal of a cross-Gram comes from the full block
            return a.gram(b).diagonal()
        return a.gram(b, diagonal=diagonal)
    if isinstance(a, DenseFactors) and not isinstance(b, DenseFactors):
        K = b.project(a.G).T
    else:
        K = a.project(materialize(b))
    return K.diagonal() if diagonal else K


def sum_gram(mine, theirs, diagonal=False):
    """K = Σ_{a,b} Uₐᵀ U_b over the contributions to one parameter (sequences): with itself
    (theirs None) the diagonal blocks plus each off-diagonal pair and its transpose, else
    every pair of mine × theirs (the cross-Gram of two batches). None when empty."""
    total = None

    def add(K):
        nonlocal total
        total = K if total is None else total + K.to(total.dtype)

    if theirs is None:
        for a_index, a in enumerate(mine):
            add(a.gram(None, diagonal=diagonal))
            for b in mine[a_index + 1:]:
                K = cross_gram(a, b, diagonal)
                add(2 * K if diagonal else K + K.T)
    else:
        for a in mine:
            for b in theirs:
                add(cross_gram(a, b, diagonal))
    return total
