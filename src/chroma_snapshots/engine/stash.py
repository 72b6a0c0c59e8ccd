"""What a checkout's one pass of coalesced reads keeps for its delta chunks.

A checkout reads every chunk it places in one pass of coalesced reads. The stored bytes
of its deltas travel in those reads, and so do the chain links below them when no local
copy has their base (a cold reader): the links lie in older packs between chunks the
version still uses, so reading them in the same pass costs no request of its own,
where reading them afterwards cost a request per pack per batch of deltas. A delta whose
whole chain has arrived is applied at once, on the worker that read its last piece, and
the pieces no other delta needs are dropped: the chain costs no tail after the reads, and
memory holds only chains still waiting for a piece. The reads carrying deltas run before
the others (``transfer.run_phases``), so a keyframe below them arrives last and completes
its chains as it passes: it is used from the read's buffer and never copied (at 3 GiB of
2-deep chains, copying keyframes that came too early filled the stash, and the chains it
dropped were read twice). At most ``STASH_BYTES`` of stored bytes are kept, deltas first;
what does not fit, and every delta resting on a local base, is left to
:func:`~chroma_snapshots.engine.delta_io.place_deltas` (in batches, downloading what the
stash does not hold). Every placed chunk is verified against its hash as it is decoded.
"""

from __future__ import annotations

import bisect
import threading
from collections import ChainMap
from collections.abc import Mapping, Sequence

from chroma_snapshots.engine.deadline import Deadline
from chroma_snapshots.engine.delta_io import local_id, resolve
from chroma_snapshots.engine.models import Chunk
from chroma_snapshots.engine.placer import Buffer, Placer
from chroma_snapshots.engine.progress import StatsRecorder
from chroma_snapshots.engine.transfer import LocalChunks, Read
from chroma_snapshots.engine.validation import MAX_CHAIN

STASH_BYTES = 64 << 20  # stored bytes of deltas and chain links kept at once
_SLICE = 32  # deltas decoded between deadline checks (and drops of their pieces)


class DeltaStash:
    """Keeps the stored bytes of ``deltas`` and of the links below them (:attr:`links`,
    which the checkout's reads must carry besides the chunks it places) as the reads
    bring them, and places each delta whose chain is complete (:attr:`applied`); what it
    keeps for the others is in :attr:`stored`."""

    def __init__(
        self,
        deltas: Sequence[Chunk],
        table: Mapping[str, Chunk],
        local: LocalChunks | None,
        placer: Placer,
        stats: StatsRecorder,
        deadline: Deadline,
    ) -> None:
        self._table, self._placer, self._stats = table, placer, stats
        self._deadline = deadline
        chains = {c.hash: chain for c in deltas if (chain := _cold_chain(c, table, local))}
        own = {c.hash for c in deltas}
        links = {p.hash: p for chain in chains.values() for p in chain if p.hash not in own}
        self.links = list(links.values())
        # tuples, not sets or lists: at 3 GiB of 2-deep chains there are 147,000 of them
        self._pieces = {h: tuple(p.hash for p in chain) for h, chain in chains.items()}
        self._missing = {h: len(pieces) for h, pieces in self._pieces.items()}
        users: dict[str, list[str]] = {}
        # how many deltas not yet placed need each piece: a delta needs its own bytes until
        # it is placed (here, or by place_deltas), and those of the links of its chain
        self._refs = dict.fromkeys(own, 1)
        for h, pieces in self._pieces.items():
            for p in pieces:
                users.setdefault(p, []).append(h)
                self._refs[p] = self._refs.get(p, 0) + (p != h)
        # piece -> deltas whose chains hold it
        self._users = {p: tuple(us) for p, us in users.items()}
        self._by_pack: dict[str, list[Chunk]] = {}
        for c in sorted([*deltas, *self.links], key=lambda c: c.offset):
            self._by_pack.setdefault(c.pack, []).append(c)
        self._starts = {p: [c.offset for c in cs] for p, cs in self._by_pack.items()}
        # room by pool: deltas first, this version's and the links' (small; a dropped one
        # leaves the rest of its chain held for nothing), keyframes in the rest (read last,
        # a keyframe is kept only if it comes in a read with deltas)
        small = [c for c in [*deltas, *self.links] if c.base is not None]
        deltas_room = min(STASH_BYTES, sum(c.length for c in small))
        self._left = {True: deltas_room, False: STASH_BYTES - deltas_room}
        self._small = {c.hash for c in small}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.stored: dict[str, Buffer] = {}
        self.applied: set[str] = set()

    def take(self, r: Read, data: Buffer) -> None:
        """Use the wanted pieces that lie entirely inside read ``r`` (``data``): a piece
        that completes every chain still needing it is used from ``data`` as it is, the
        others are copied in while there is room; then decode and place every delta whose
        chain is complete."""
        chunks = self._by_pack.get(r.pack)
        if not chunks:
            return
        i = bisect.bisect_left(self._starts[r.pack], r.start)
        j, end = i, min(r.end, r.start + len(data))  # a short read keeps what it holds
        while j < len(chunks) and chunks[j].offset + chunks[j].length <= end:
            j += 1
        with self._lock:  # room first, copies after: only what is kept is ever copied
            passing, ready = self._complete(chunks[i:j])
            keep = [c for c in chunks[i:j] if c.hash not in passing and self._reserve(c)]
        at = r.start
        views = {h: data[c.offset - at : c.offset - at + c.length] for h, c in passing.items()}
        found = {c.hash: bytes(data[c.offset - at : c.offset - at + c.length]) for c in keep}
        with self._lock:
            self.stored.update(found)
            for h in found:
                for user in self._users.get(h, ()):
                    self._missing[user] -= 1
                    if not self._missing[user]:
                        ready.append(user)
        self._stats.add(chunks_transferred=len(found) + len(views))
        if ready:
            self._apply(ready, views)

    def _complete(self, arriving: Sequence[Chunk]) -> tuple[dict[str, Chunk], list[str]]:
        """The pieces of ``arriving`` not seen before that complete every chain still
        needing them (each alongside pieces already kept), and the deltas they complete.
        Such a piece is used while its read's bytes are at hand and never copied: a
        keyframe, read after the deltas above it, costs the stash nothing. Called under
        the lock."""
        fresh = {c.hash: c for c in arriving if c.hash not in self._seen}
        count: dict[str, int] = {}
        for h in fresh:
            for user in self._users.get(h, ()):
                count[user] = count.get(user, 0) + 1
        done = {u for u, n in count.items() if n == self._missing[u]}
        while True:  # a chain completes only if all its pieces here pass; shrinks to a fixpoint
            passing = {
                h: c for h, c in fresh.items() if h in self._users and set(self._users[h]) <= done
            }
            short = {
                u for u in done if any(p in fresh and p not in passing for p in self._pieces[u])
            }
            if not short:
                break
            done -= short
        self._seen.update(passing)
        for u in done:
            self._missing[u] = 0
        return passing, list(done)

    def _reserve(self, c: Chunk) -> bool:
        """Make room for piece ``c`` unless it was already kept (or used) or its pool is
        full (it is then read again later). Called under the lock."""
        pool = c.hash in self._small
        if c.hash in self._seen or c.length > self._left[pool]:
            return False
        self._seen.add(c.hash)
        self._left[pool] -= c.length
        return True

    def _apply(self, ready: list[str], views: dict[str, Buffer]) -> None:
        """Decode (each verified) and place the deltas ``ready``, a slice at a time, with
        pieces from ``views`` or the stash, and drop the pieces no delta still needs: a
        piece is freed only once every delta that needs it is placed."""
        stored = ChainMap(views, self.stored)
        for i in range(0, len(ready), _SLICE):
            self._deadline.check("applying deltas")
            part = ready[i : i + _SLICE]
            t = self._table
            self._placer.place_many([(h, resolve(t[h], t, {}, stored)) for h in part])
            with self._lock:
                for h in part:
                    self.applied.add(h)
                    for p in self._pieces[h]:
                        self._refs[p] -= 1
                        kept = None if self._refs[p] else self.stored.pop(p, None)
                        if kept is not None:
                            self._left[p in self._small] += len(kept)


def _cold_chain(c: Chunk, table: Mapping[str, Chunk], local: LocalChunks | None) -> list[Chunk]:
    """``c`` and the links below it down to a keyframe, if none is in a local copy and
    the chain is whole and bounded; else [] (such a delta is left to ``place_deltas``,
    which uses the local base, or refuses the chain)."""
    chain = [c]
    while chain[-1].base is not None:
        base = table.get(chain[-1].base)
        if base is None or len(chain) > MAX_CHAIN or local_id(local, base) is not None:
            return []
        chain.append(base)
    return chain
