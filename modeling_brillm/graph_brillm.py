"""The edge graph of BriLLM: which edges own a parameter slot, as CSR buffers saved with the weights (SPEC §2).

Slot 0 is shared by every edge that owns nothing; the own slots are numbered row-major in node-id order, so the
own slots of one source form one contiguous slab of the edge matrices. This file is a flat sibling of
``modeling_brillm.py`` (copied next to the weights as remote code): it imports only torch.
"""

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def dense_graph(vocab_size):
    """CSR slot map of the dense graph (every edge owns a slot): ``(row_ptr (V+1,) int64, col_idx (V*V,) int32)``."""
    row_ptr = torch.arange(0, vocab_size + 1, dtype=torch.int64) * vocab_size
    col_idx = torch.arange(vocab_size, dtype=torch.int32).repeat(vocab_size)
    return row_ptr, col_idx


class BriLLMEdgeGraph(nn.Module):
    """Which edges own a parameter slot, as CSR buffers saved with the weights.

    Slots are numbered row-major in node-id order: source ``s`` owns slots ``1 + row_ptr[s] .. row_ptr[s+1]``
    (one contiguous slab of ``weights``), whose targets are the sorted ``col_idx[row_ptr[s]:row_ptr[s+1]]``.
    Every other edge uses the shared slot 0.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm.graph_brillm import BriLLMEdgeGraph
    >>> graph = BriLLMEdgeGraph(vocab_size=3, num_slots=4)
    >>> graph.set_graph(torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 1], dtype=torch.int32))
    >>> graph.slots(torch.tensor([0, 0, 1, 2]), torch.tensor([2, 1, 1, 1])).tolist()  # 0->1 and 1->1 are shared
    [2, 0, 0, 3]

    ```
    """

    def __init__(self, vocab_size, num_slots):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_slots = num_slots
        self.register_buffer("row_ptr", torch.empty(vocab_size + 1, dtype=torch.int64))
        self.register_buffer("col_idx", torch.empty(num_slots - 1, dtype=torch.int32))
        self.reset_graph()

    @property
    def is_dense(self):
        return self.num_slots == 1 + self.vocab_size * self.vocab_size

    @torch.no_grad()
    def reset_graph(self):
        """The slot map a config alone defines: the dense graph, or for a sparse one all zeros (invalid on
        purpose: a sparse slot map comes from set_graph()/from_graph() or a checkpoint, and check() says so)."""
        if self.row_ptr.device.type != "meta":
            if self.is_dense:
                row_ptr, col_idx = dense_graph(self.vocab_size)
                self.row_ptr.copy_(row_ptr)
                self.col_idx.copy_(col_idx)
            else:
                self.row_ptr.zero_()
                self.col_idx.zero_()
        self._checked = False
        self._derived = {}  # tables computed from the buffers: see `_table`

    def extra_repr(self):
        kind = "dense" if self.is_dense else "sparse"
        return f"vocab_size={self.vocab_size}, num_slots={self.num_slots} ({kind}: {self.num_slots - 1} owned edges)"

    @classmethod
    def from_edge_keys(cls, keys, vocab_size):
        """The graph whose owned edges have the sorted distinct keys ``source * V + target`` (any int array)."""
        keys = torch.as_tensor(keys, dtype=torch.int64)
        if keys.numel() and not (0 <= int(keys.min()) and int(keys.max()) < vocab_size * vocab_size):
            raise ValueError(f"edge keys must lie in [0, vocab_size**2 = {vocab_size * vocab_size}).")
        graph = cls(vocab_size, 1 + keys.numel())
        row_ptr = torch.zeros(vocab_size + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(keys // vocab_size, minlength=vocab_size), 0, out=row_ptr[1:])
        graph.set_graph(row_ptr, keys % vocab_size)
        return graph

    def set_graph(self, row_ptr, col_idx):
        """Install a CSR slot map (validated; raises `ValueError` when it does not fit this graph)."""
        row_ptr = torch.as_tensor(row_ptr, dtype=torch.int64)
        col_idx = torch.as_tensor(col_idx, dtype=torch.int32)
        self._validate(row_ptr, col_idx)
        with torch.no_grad():
            self.row_ptr.copy_(row_ptr)
            self.col_idx.copy_(col_idx)
        self._checked = True
        self._derived = {}

    def check(self):
        """Validate the buffers once (after construction or loading); raises `ValueError` if they are unusable."""
        if not self._checked:
            self._validate(self.row_ptr, self.col_idx)
            self._checked = True
            self._derived = {}

    def _validate(self, row_ptr, col_idx):
        V, own = self.vocab_size, self.num_slots - 1
        if tuple(row_ptr.shape) != (V + 1,) or tuple(col_idx.shape) != (own,):
            raise ValueError(
                f"edge graph buffers have shapes row_ptr {tuple(row_ptr.shape)} and col_idx {tuple(col_idx.shape)}, "
                f"but the config says vocab_size={V} and num_slots={self.num_slots}: expected row_ptr ({V + 1},) "
                f"and col_idx ({own},). The checkpoint and its config.json do not belong together."
            )
        if row_ptr.device.type == "meta":
            return
        if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != own or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError(
                f"edge graph row_ptr must start at 0, never decrease and end at num_slots - 1 = {own}; it ends at "
                f"{int(row_ptr[-1])}. If this is a sparse model, build the graph with set_graph()/from_graph() "
                "or load it from a checkpoint that contains it."
            )
        if own == 0:
            return
        if int(col_idx.min()) < 0 or int(col_idx.max()) >= V:
            raise ValueError(f"edge graph col_idx holds targets outside [0, {V}).")
        keys = edge_keys(row_ptr, col_idx, V)
        if bool((keys[1:] <= keys[:-1]).any()):
            raise ValueError("edge graph col_idx must be strictly increasing within each source row (no duplicates).")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._checked = False
        self._derived = {}

    def _table(self, name, build):
        """A table derived from the buffers, kept until they change (set_graph, loading) or move (``.to()``)."""
        key = (self.row_ptr.data_ptr(), self.col_idx.data_ptr())
        entry = self._derived.get(name)
        if entry is None or entry[0] != key:
            entry = self._derived[name] = (key, build())
        return entry[1]

    def targets(self):
        """``col_idx`` as int64, the index type of scatters: (P-1,)."""
        return self._table("targets", lambda: self.col_idx.long())

    def _host(self):
        """``(row_ptr, col_idx)`` as NumPy arrays for host-side look-ups (views of the buffers on the CPU)."""
        return self._table("host", lambda: (self.row_ptr.cpu().numpy(), self.col_idx.cpu().numpy()))

    def row(self, source):
        """``(lo, hi)``: the owned edges of ``source`` (a host int) are ``lo .. hi-1``, its slots ``1+lo .. hi``."""
        row_ptr = self._host()[0]
        return int(row_ptr[source]), int(row_ptr[source + 1])

    def degrees(self):
        """Number of owned out-edges of every node: (V,) int64."""
        return self.row_ptr[1:] - self.row_ptr[:-1]

    def slots(self, sources, targets):
        """Slot of each edge ``sources[i] -> targets[i]`` (any shape; 0 where the edge is shared)."""
        owned = self._table("edge_keys", lambda: edge_keys(self.row_ptr, self.col_idx, self.vocab_size))
        keys = sources.long() * self.vocab_size + targets.long()
        if owned.numel() == 0:
            return torch.zeros_like(keys)
        found = torch.searchsorted(owned, keys)
        hit = owned[found.clamp(max=owned.numel() - 1)] == keys
        return torch.where(hit, found + 1, torch.zeros_like(found))

    def slot(self, source, target):
        """Slot of one edge given as host ints (0 when shared): a binary search in the source's row."""
        lo, hi = self.row(source)
        col_idx = self._host()[1]
        k = lo + int(col_idx[lo:hi].searchsorted(target))
        return 1 + k if k < hi and int(col_idx[k]) == target else 0


def edge_keys(row_ptr, col_idx, vocab_size):
    """``source * V + target`` of every owned edge, in slot order (sorted for a valid graph): (P-1,) int64."""
    sources = torch.repeat_interleave(torch.arange(vocab_size, device=row_ptr.device), row_ptr[1:] - row_ptr[:-1])
    return sources * vocab_size + col_idx.long()


# parameter -> the storage of its last dense slot gradient on CPU (see `zeroed_gradient`)
_kept_gradients = WeakIdKeyDictionary()
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def zeroed_gradient(param, written=()):
    """A zeroed full-size gradient for ``param``; on CPU in the storage of the previous one once nothing else holds it.

    glibc maps every allocation over 32 MB afresh, so a new (P, d, d) gradient is page-faulted in at every step:
    0.57 s for the 1.8 GB gradient of V = 4000, d = 32, against 0.14 s to zero kept memory. The tensor handed to
    autograd becomes ``param.grad``; once ``zero_grad(set_to_none=True)`` (or anything) lets go of it, only the
    storage kept here remains and the next backward zeroes and reuses it. Anything still holding it (a kept
    ``param.grad``, gradient accumulation, a user's reference) gets a new tensor instead. On CUDA the caching
    allocator already reuses memory. `forget_gradients` drops the kept storage (the model's ``eval()`` does).
    ``written``: sorted, disjoint ``(start, stop)`` row ranges the caller overwrites whole; they are left unzeroed.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm.graph_brillm import zeroed_gradient
    >>> param = torch.nn.Parameter(torch.ones(1000, 4, 4))
    >>> first = zeroed_gradient(param)
    >>> pointer = first.data_ptr()
    >>> del first  # as zero_grad(set_to_none=True) drops param.grad
    >>> second = zeroed_gradient(param)
    >>> second.data_ptr() == pointer, bool((second == 0).all())
    (True, True)
    >>> zeroed_gradient(param).data_ptr() == pointer  # `second` is still held
    False

    ```
    """
    kept = _kept_gradients.get(param)  # reusable if still the same size and place (`module.to` keeps the Parameter)
    fits = kept is not None and kept.device == param.device and kept.nbytes() == param.numel() * param.element_size()
    if fits and _use_count(kept._cdata) == 1:
        values = param.new_empty(0).set_(kept, 0, param.shape)
    else:
        values = torch.empty_like(param, memory_format=torch.contiguous_format)
        if param.device.type == "cpu" and _use_count is not None:
            _kept_gradients[param] = values.untyped_storage()
    start = 0
    for lo, hi in [*written, (len(param), len(param))]:
        if lo > start:
            values[start:lo].zero_()
        start = hi
    return values


def forget_gradients(*params):
    """Let go of the gradient storage `zeroed_gradient` keeps for ``params`` (freed once nothing else holds it)."""
    for param in params:
        _kept_gradients.pop(param, None)


class SlotRows:
    """The one layout of a slot gradient (of ``weights`` or ``biases``, (P, ...)): dense, all P rows in ``values``;
    or sparse, the rows of the sorted ``slots`` only (a coalesced COO tensor). Subclasses fill ``shape``,
    ``sparse``, ``values`` and, when sparse, ``slots``."""

    def add_rows(self, slots, grad):
        """Add ``grad`` (n, ...) at ``slots`` (n,); False (nothing added) when a sparse gradient lacks a slot."""
        if self.sparse:
            found = torch.searchsorted(self.slots, slots).clamp(max=self.slots.numel() - 1)
            if not bool((self.slots[found] == slots).all()):
                return False
            slots = found
        self.values.index_add_(0, slots, grad.to(self.values.dtype))
        return True

    def tensor(self):
        if not self.sparse:
            return self.values
        return torch.sparse_coo_tensor(
            self.slots[None], self.values, self.shape, is_coalesced=True, check_invariants=False
        )


__all__ = ["BriLLMEdgeGraph", "SlotRows", "dense_graph", "edge_keys", "forget_gradients", "zeroed_gradient"]
