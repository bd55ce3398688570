"""Roll a running request's KV blocks back to a FASB backtrack's first steered position, in place.

A backtrack keeps the request running: its KV blocks past ``steer_from`` go back to the pool, and
the block that holds ``steer_from`` (the "partly kept" block, whose positions from ``steer_from`` on
are recomputed under steering) is made private and hash-free first:

* writable (only this request holds it, no prefix-cache hash): kept as is;
* shared with another request, or cached under a hash (its content is the one that hash names):
  copied into a fresh block (vLLM's copy-on-write, ``_apply_cow``; the workers run the copy with the
  next step, before it writes), so the old block keeps its hash and its content and nothing is ever
  served under a stale hash or written under another request;
* cached, held by this request only, and no free block for a copy: evicted from the prefix cache,
  then written in place.

Block indices use each KV manager's own ``block_size``. The caller (``scheduler._backtrack``) asks
``plan`` first; it returns why the rollback cannot be done in place (and the request is preempted
instead), or a plan that ``apply`` carries out without failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_steer.integration.compat import block_is_writable

COPY, EVICT, KEEP, DROP = "copy", "evict", "keep", "drop"


@dataclass
class ManagerPlan:
    manager: object
    keep: int  # blocks kept, the partly kept one included
    action: str  # for block keep - 1: KEEP, COPY or EVICT; DROP when no block is partly kept


@dataclass
class RollbackPlan:
    managers: list[ManagerPlan] = field(default_factory=list)

    @property
    def num_copies(self) -> int:
        return sum(m.action == COPY for m in self.managers)


def _mm_ends_after(request, position: int) -> bool:
    for feature in getattr(request, "mm_features", None) or ():
        placeholder = getattr(feature, "mm_position", None)
        if placeholder is None:
            return True  # unknown layout: do not roll back through it
        if placeholder.offset + placeholder.length > position:
            return True
    return False


def plan(scheduler, request, steer_from: int) -> RollbackPlan | str:
    """What an in-place rollback of ``request`` to ``steer_from`` does, or why it cannot be done."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.request import RequestStatus

    if request.status != RequestStatus.RUNNING:
        return f"request is {request.status.name}"
    if getattr(scheduler, "connector", None) is not None:
        return "KV connector"
    if _mm_ends_after(request, steer_from):
        return "multimodal input after the backtrack position"
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    if any(type(m) is not FullAttentionManager for m in managers):
        return "KV cache group other than full attention"
    rid = request.request_id
    result = RollbackPlan()
    free_by_pool: dict[int, int] = {}
    for m in managers:
        blocks = m.req_to_blocks.get(rid) or []
        s, offset = divmod(steer_from, m.block_size)
        pool = m.block_pool
        if len(blocks) <= s:
            return f"request holds {len(blocks)} blocks, position {steer_from} needs {s + 1}"
        if id(pool) not in free_by_pool:
            free_by_pool[id(pool)] = pool.get_num_free_blocks()
        # apply() frees the tail before it takes a block for a copy
        free_by_pool[id(pool)] += sum(1 for t in blocks[s + 1:] if t.ref_cnt == 1 and not t.is_null)
        if offset == 0:  # nothing before steer_from in block s: it goes back with the tail
            result.managers.append(ManagerPlan(m, s, DROP))
            continue
        b = blocks[s]
        if block_is_writable(pool, b):
            action = KEEP
        elif free_by_pool[id(pool)] > 0:
            action = COPY
            free_by_pool[id(pool)] -= 1
        elif b.ref_cnt == 1:
            action = EVICT
        else:
            return "no free KV block to copy a shared block into"
        result.managers.append(ManagerPlan(m, s + 1, action))
    return result


def apply(request, rollback: RollbackPlan) -> None:
    """Carry out ``rollback`` (from ``plan``) on ``request``'s blocks."""
    rid = request.request_id
    for mp in rollback.managers:
        m, pool = mp.manager, mp.manager.block_pool
        blocks = m.req_to_blocks[rid]
        tail = blocks[mp.keep:]
        del blocks[mp.keep:]
        # The tail's content still matches its hashes: cached tail blocks stay cached, evicted last.
        pool.free_blocks(reversed(tail))
        if mp.action == DROP:
            num_hashed = mp.keep
        else:
            num_hashed = mp.keep - 1
            s = mp.keep - 1
            b = blocks[s]
            if mp.action == COPY:
                cow = pool.get_new_blocks(1)[0]
                m._apply_cow(rid, s, b, cow)
                if m.records_new_block_ids:
                    m.new_block_ids.append(cow.block_id)
            elif mp.action == EVICT:
                pool.evict_blocks({b.block_id})
        if rid in m.num_cached_block:
            m.num_cached_block[rid] = min(m.num_cached_block[rid], num_hashed)
