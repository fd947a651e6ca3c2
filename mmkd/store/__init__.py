"""The teacher store: the frozen teacher's outputs for K augmented views of every sample of a
split, computed once and read back memory-mapped by every later epoch, run and seed.

View `v` of sample `i` is the teacher's output on the input augmented inside
`replay_scope(store seed, id, v)` (mmkd.replay), so the data loader can replay exactly that view
for a student of the same modality. With no augmentation of the teacher's input every view is
the same and the store keeps one (K=1: the old teacher cache).

An entry lives in `ROOT/<key>/`; the key hashes everything that defines its contents: the
teacher's weights, its preprocessing (augmentation settings included) and the versions of the
libraries that implement it, the split's data and sample ids, K, the augmentation seed and the
stored precision. Layout, rows in the split's sample order:

    meta.json        identity, count, views, array specs
    ids.txt          the sample ids, one per line (for people; not read on open)
    id_hash.npy      uint64 hashes of the ids, sorted; row.npy: the row of each hash
    present.npy      uint8 (N, K): 0 where a sample could not be read (data.on_error=skip)
    embedding.npy    (N, K, D)           float32 | float16 | bfloat16 (stored as int16 bits)
    logits.npy       (N, K, C)           or, with logits_topk=k,
    topk_values.npy  (N, K, k) + topk_index.npy (N, K, k) int32
    feature.I.npy    (N, K, *shape)      the I-th teacher feature the loss terms read (a layer's
                                         output, or the reduced form a term uses, e.g. an
                                         attention map), in the same dtype; meta.json names them

It is built in `ROOT/<key>.partial/`, chunk by chunk (`chunk_size` samples x K views); a chunk
is marked done, with a checksum, only after its rows are flushed, so a killed build resumes at
the first chunk not done. The finished folder is renamed into place: readers see a complete
entry or none.

Integrity: meta.json keeps a CRC-32 of every chunk (its rows of every per-row array) and of the
id index (id_hash.npy + row.npy). Opening checks counts, shapes and dtypes, then every checksum,
before any row is used. A chunk that fails is rebuilt alone (the teacher runs on its samples
only); a damaged index is rewritten from the sample ids; anything else is rebuilt whole. Never
read silently.

Concurrency and disk space: one builder per entry, by a file lock (`ROOT/<key>.lock`, filelock;
the kernel releases it when its process dies, so the next run takes over a dead builder's
partial build and resumes it). A second run waits for the lock, then finds the finished entry.
Before writing, the free space is checked against the entry's size and the arrays are
preallocated (`posix_fallocate`), so a full disk is one line naming the path and the bytes
needed, never a SIGBUS from a sparse memory map. `mmkd store list|gc ROOT` shows and removes
leftover partial builds.

Modules, one job each: key.py (what identifies an entry), format.py (dtypes, id index,
checksums), read.py (TeacherStore: open and look up), build.py (StoreBuilder: the chunked,
resumable writer), coordination.py (processes and the file lock: open_or_build), targets.py
(TeacherTargets, live or stored).
"""

from mmkd.store.build import StoreBuilder, finalize, teacher_collate
from mmkd.store.coordination import Collective, open_or_build
from mmkd.store.key import StoreSpec, data_content, store_key
from mmkd.store.read import StoreDamaged, TeacherStore
from mmkd.store.targets import TeacherTargets, teacher_outputs

__all__ = [  # what the rest of mmkd, the tests and the benchmarks use; the rest is internal
    "Collective",
    "StoreBuilder",
    "StoreDamaged",
    "StoreSpec",
    "TeacherStore",
    "TeacherTargets",
    "data_content",
    "finalize",
    "open_or_build",
    "store_key",
    "teacher_collate",
    "teacher_outputs",
]
