"""Resumable data streams: WebDataset shards, the synthetic dataset and the 2-D toy.

    stream = build_stream(config.data, rank=rank, world_size=world, micro_batch_size=m, seed=s)
    for batch in stream: ...              # endless; see `epoch` and `batches_per_epoch`
    state = stream.state_dict()           # small and picklable: save it with every checkpoint
    stream.load_state_dict(state)         # a new stream continues exactly where that one stopped

How a WebDataset stream orders its samples (all of it deterministic in the seed, the rank and the
worker, so that a resumed run sees what the uninterrupted run would have seen):

1. Splitting. Every (rank, worker) pair is one of G = world_size * max(1, num_workers) readers.
   A source with at least G shards is split by shard: each pass over the source is a seeded
   permutation of its shards, dealt out to the G readers. A source with fewer shards is split
   by sample: every reader reads every shard and keeps every G-th sample.
2. Resampling. Each reader draws shards pass after pass without end, so every rank receives the
   same, unbounded number of batches however the shards divide: collectives never wait on a rank
   that ran out of data. An epoch is a fixed number of batches (`batches_per_epoch`).
3. Mixing and shuffling. Each source keeps `shuffle_shards` shards open; every sample is drawn
   from a source chosen by weight and one of its open shards at random. Samples are taken in
   chunks of `shuffle_buffer` and each chunk is permuted.
4. Batching. Rows are decoded in chunk order and grouped by bucket (image size, or latent shape);
   a bucket that fills emits a batch. Within a bucket, a row joins the first waiting group that
   does not hold its key, so a batch never holds one sample twice (a small source read pass
   after pass repeats samples within a chunk). Rows left in unfilled groups at the end of a
   chunk are dropped (counted as `dropped`).

The position of a reader after a batch is small: the index of its chunk, the open shards and
sample offsets at the chunk's start, the scan position in the chunk and the chunk positions of
rows waiting in buckets (per bucket, a list of waiting groups). Resuming re-reads one chunk's
raw bytes (and the open shards up to their offsets), never a whole epoch. With DataLoader
workers, worker i delivers batches i, i + W, i + 2W, ...; the stream records every worker's
position and, after a restart, rotates the workers so that the next batch comes from the worker
whose turn it was.

Bad data (corrupt tar, undecodable image, empty caption, missing field) is skipped, counted and
logged with shard and key; when a reader's fraction of bad samples exceeds `max_bad_fraction`
(judged after `MIN_SAMPLES_FOR_BAD_FRACTION` samples) the run stops with DataQualityError.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from apex_dist.config import DEFAULT_READ_TIMEOUT_SECONDS
from apex_dist.data.samples import BadSample, Decoded, SampleDecoder, collate
from apex_dist.data.sources import RawSample, expand_urls, indexed_sample_count, read_shard

logger = logging.getLogger("apex_dist.data")

STATE_FORMAT = 1
# The bad-sample fraction is only judged after this many samples per reader, so that one broken
# shard at the start of a run does not stop it (1 bad sample in 100 is a 1% fraction).
MIN_SAMPLES_FOR_BAD_FRACTION = 100
# Descriptions of the most recent bad samples kept in the state, for the error message.
RECENT_BAD_KEPT = 5
# A chunk holds at least this many batches, so that bucketing drops few rows per chunk.
MIN_BATCHES_PER_CHUNK = 4
# DataLoader batches prefetched per worker.
PREFETCH_BATCHES = 2
# Chunks in a row without a single batch after which a reader stops: its samples cannot fill a
# micro-batch of distinct samples in one bucket (too little data for the readers, or buckets
# spread too thin for the chunk), and reading on would spin for ever without a batch.
MAX_CHUNKS_WITHOUT_A_BATCH = 8
# Shards in a row whose reads stalled (no data for data.read_timeout_seconds) after which a
# reader stops the run: one stalled shard is skipped like a corrupt one, but several in a row
# mean that the storage or the command is down, and waiting on every shard would take hours.
MAX_STALLED_SHARDS_IN_A_ROW = 3


class DataQualityError(RuntimeError):
    """Too many bad samples: the data (or its configuration) needs fixing before training."""


class DataStateError(ValueError):
    """A saved stream state that does not fit the stream it is loaded into."""


def _seeded(*parts: Any) -> random.Random:
    """A random generator seeded by a tuple of values (stable across processes and runs)."""
    return random.Random(":".join(str(part) for part in parts))


# --------------------------------------------------------------------------------------------
# one reader: the (rank, worker) pair's view of the shards


class ShardPlan:
    """Which shard a reader opens on its n-th visit of a source, and which samples it keeps."""

    def __init__(self, urls: list[str], source: int, reader: int, readers: int, seed: int):
        self.urls, self.source, self.reader, self.readers, self.seed = (
            urls,
            source,
            reader,
            readers,
            seed,
        )
        self.split_by_shard = len(urls) >= readers
        self.visits_per_pass = (
            len(range(reader, len(urls), readers)) if self.split_by_shard else len(urls)
        )

    def shard(self, visit: int) -> str:
        pass_index, position = divmod(visit, self.visits_per_pass)
        order = list(range(len(self.urls)))
        _seeded(self.seed, "pass", self.source, pass_index).shuffle(order)
        if self.split_by_shard:
            return self.urls[order[self.reader + position * self.readers]]
        return self.urls[order[position]]

    def keeps(self, sample_index: int) -> bool:
        return self.split_by_shard or sample_index % self.readers == self.reader


class InterleavedReader:
    """Draws raw samples from the sources by weight, `slots` open shards per source.

    Its state: per source, the number of shards visited and per slot the open shard's visit
    number and the offset of the next sample, or None for a slot to be filled.
    """

    def __init__(
        self,
        plans: list[ShardPlan],
        weights: list[float],
        slots: int,
        state=None,
        read_timeout: float = DEFAULT_READ_TIMEOUT_SECONDS,
    ):
        self.plans, self.weights, self.read_timeout = plans, weights, read_timeout
        self.stalled: list[str] = []  # the stalled shards since the last good sample
        # more open shards than a pass has would read one shard twice at once
        self.state = state or {
            "sources": [
                {"visits": 0, "slots": [None] * min(slots, plan.visits_per_pass)} for plan in plans
            ]
        }
        self.open: dict[tuple[int, int], Iterator[RawSample]] = {}

    def snapshot(self) -> dict:
        return copy.deepcopy(self.state)

    def close(self) -> None:
        for iterator in self.open.values():
            iterator.close()
        self.open.clear()

    def _open(self, source: int, slot: int) -> Iterator[RawSample]:
        slot_state = self.state["sources"][source]["slots"][slot]
        url = self.plans[source].shard(slot_state["visit"])
        return read_shard(url, skip=slot_state["offset"], read_timeout=self.read_timeout)

    def _check_stalls(self, sample: RawSample) -> None:
        if not sample.stalled:
            self.stalled = []
            return
        self.stalled.append(sample.url)
        if len(self.stalled) >= MAX_STALLED_SHARDS_IN_A_ROW:
            raise DataQualityError(
                f"{len(self.stalled)} shards in a row gave no data for {self.read_timeout:g} s "
                f"(data.read_timeout_seconds): {', '.join(self.stalled)}; the storage or the "
                "pipe: command stalled: check that it answers (or raise the timeout for slow "
                "storage), then resume"
            )

    def draw(self, rng: random.Random) -> RawSample:
        source = rng.choices(range(len(self.plans)), weights=self.weights)[0]
        source_state = self.state["sources"][source]
        slot = rng.randrange(len(source_state["slots"]))
        plan = self.plans[source]
        # a source whose shards all yield nothing would loop for ever: give up after a full pass
        empty_visits = 0
        while True:
            if source_state["slots"][slot] is None:
                source_state["slots"][slot] = {"visit": source_state["visits"], "offset": 0}
                source_state["visits"] += 1
            if (source, slot) not in self.open:
                self.open[(source, slot)] = self._open(source, slot)
            for sample in self.open[(source, slot)]:
                source_state["slots"][slot]["offset"] = sample.index + 1
                self._check_stalls(sample)
                if sample.error is not None:
                    self.open.pop((source, slot)).close()
                    source_state["slots"][slot] = None
                    return sample
                if plan.keeps(sample.index):
                    return sample
            self.open.pop((source, slot))
            source_state["slots"][slot] = None
            empty_visits += 1
            if empty_visits > plan.visits_per_pass + 1:
                raise DataQualityError(
                    f"source {plan.source} ({plan.urls[0]} ...) gave no samples to reader "
                    f"{plan.reader} from {empty_visits} shards in a row: check that its shards "
                    "exist and are non-empty tar files"
                )


class ReaderStream:
    """The batches of one reader (one rank's one worker), resumable from `position` dicts."""

    def __init__(self, settings: dict, reader: int, readers: int, position: dict | None):
        self.settings = settings
        self.reader, self.readers = reader, readers
        self.micro_batch_size = settings["micro_batch_size"]
        self.chunk_size = max(
            settings["shuffle_buffer"], MIN_BATCHES_PER_CHUNK * self.micro_batch_size
        )
        self.decoder = SampleDecoder(
            settings["sample_kind"],
            settings["caption_key"],
            settings["resolution"],
            settings["aspect_buckets"],
        )
        self.max_bad_fraction = settings["max_bad_fraction"]
        self.plans = [
            ShardPlan(urls, source, reader, readers, settings["seed"])
            for source, urls in enumerate(settings["sources"])
        ]
        self.position = position or {
            "chunk": 0,
            "reader": None,
            "scan": 0,
            "pending": {},
            "stats": {"seen": 0, "bad": 0, "dropped": 0, "recent_bad": []},
        }

    def _fill(self, reader: InterleavedReader, chunk: int) -> list[RawSample]:
        rng = _seeded(self.settings["seed"], "chunk", self.reader, chunk)
        samples = [reader.draw(rng) for _ in range(self.chunk_size)]
        if self.settings["shuffle_buffer"] > 1:
            rng.shuffle(samples)
        return samples

    def _count_bad(self, stats: dict, sample: RawSample, reason: str) -> None:
        stats["bad"] += 1
        message = f"{sample.describe()}: {reason}"
        stats["recent_bad"] = [*stats["recent_bad"], message][-RECENT_BAD_KEPT:]
        logger.warning("skipped bad sample (%s)", message)
        if (
            stats["seen"] >= MIN_SAMPLES_FOR_BAD_FRACTION
            and stats["bad"] > self.max_bad_fraction * stats["seen"]
        ):
            recent = "\n  ".join(stats["recent_bad"])
            raise DataQualityError(
                f"{stats['bad']} of {stats['seen']} samples read by rank-worker reader "
                f"{self.reader} were bad, more than data.max_bad_fraction="
                f"{self.max_bad_fraction}; fix or remove the broken shards (or raise the "
                f"limit). Most recent:\n  {recent}"
            )

    def _decode(self, sample: RawSample) -> Decoded:
        if sample.error is not None:
            raise BadSample(sample.error)
        return self.decoder(sample.key, sample.members)

    @staticmethod
    def _check_widths(widths: dict, row: Decoded, sample: RawSample) -> None:
        """Rows of a stream share their text width and latent channels (`Decoded.widths`):
        the first row read sets them (kept in the position, so a resume keeps them too)."""
        for name, value in row.widths.items():
            if name not in widths:
                widths[name] = [value, sample.describe()]
            elif widths[name][0] != value:
                raise BadSample(
                    f"{name} {value} differs from the {widths[name][0]} of this stream's first "
                    f"sample ({widths[name][1]}): all samples need the same encoder"
                )

    def batches(self) -> Iterator[tuple[dict, dict]]:
        """Endless (batch, position after the batch) pairs."""
        position = copy.deepcopy(self.position)
        reader = InterleavedReader(
            self.plans,
            self.settings["weights"],
            self.settings["shuffle_shards"],
            copy.deepcopy(position["reader"]),
            self.settings.get("read_timeout_seconds", DEFAULT_READ_TIMEOUT_SECONDS),
        )
        try:
            chunks_without_a_batch = 0
            while True:
                chunk_index = position["chunk"]
                chunk_start = reader.snapshot()
                samples = self._fill(reader, chunk_index)
                # per bucket, the groups of rows waiting to fill a batch: a row joins the first
                # group without its key, so a batch never holds one sample twice (a small
                # source read pass after pass repeats samples within a chunk)
                buckets: dict[str, list[list[tuple[int, Decoded]]]] = {
                    bucket: [
                        [(index, self._decode(samples[index])) for index in group]
                        for group in _pending_groups(groups)
                    ]
                    for bucket, groups in position["pending"].items()
                }
                stats = position["stats"]
                widths = position.setdefault("widths", {})
                emitted = False
                for index in range(position["scan"], len(samples)):
                    sample = samples[index]
                    stats["seen"] += 1
                    try:
                        row = self._decode(sample)
                        self._check_widths(widths, row, sample)
                    except BadSample as error:
                        self._count_bad(stats, sample, str(error))
                        continue
                    groups = buckets.setdefault(row.bucket, [])
                    waiting = _group_without(groups, row.key)
                    waiting.append((index, row))
                    if len(waiting) == self.micro_batch_size:
                        del groups[next(i for i, group in enumerate(groups) if group is waiting)]
                        if not groups:
                            del buckets[row.bucket]
                        after = {
                            "chunk": chunk_index,
                            "reader": chunk_start,
                            "scan": index + 1,
                            "pending": {
                                name: [[entry[0] for entry in group] for group in groups]
                                for name, groups in buckets.items()
                            },
                            "stats": copy.deepcopy(stats),
                            "widths": copy.deepcopy(widths),
                        }
                        emitted = True
                        yield collate([entry[1] for entry in waiting]), after
                stats["dropped"] += sum(
                    len(group) for groups in buckets.values() for group in groups
                )
                chunks_without_a_batch = 0 if emitted else chunks_without_a_batch + 1
                if chunks_without_a_batch >= MAX_CHUNKS_WITHOUT_A_BATCH:
                    raise DataQualityError(
                        f"reader {self.reader} of {self.readers} made no batch of "
                        f"{self.micro_batch_size} distinct samples from {chunks_without_a_batch} "
                        f"chunks of {self.chunk_size} samples in a row: its share of the data "
                        "(split by sample, a source with fewer shards than readers gives each "
                        "reader 1/readers of its samples) or of one bucket is smaller than a "
                        "micro-batch; add data, use fewer ranks or data.num_workers, a smaller "
                        "micro-batch, fewer aspect_buckets, or a larger data.shuffle_buffer"
                    )
                position = {
                    "chunk": chunk_index + 1,
                    "reader": reader.snapshot(),
                    "scan": 0,
                    "pending": {},
                    "stats": stats,
                    "widths": widths,
                }
        finally:
            reader.close()


def _group_without(groups: list[list[tuple[int, Decoded]]], key: str) -> list:
    """The first waiting group that does not hold `key`; a new one, appended, if all do."""
    for group in groups:
        if all(row.key != key for _, row in group):
            return group
    groups.append([])
    return groups[-1]


def _pending_groups(pending: list) -> list[list[int]]:
    """The waiting groups of one bucket from a position: lists of chunk indices (a state saved
    before groups existed holds one flat list)."""
    if pending and all(isinstance(index, int) for index in pending):
        return [pending]
    return pending


class _WorkerDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: the batches of its logical reader."""

    def __init__(self, settings: dict, positions: list, rotation: int):
        super().__init__()
        self.settings, self.positions, self.rotation = settings, positions, rotation

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = len(self.positions)
        worker = ((info.id if info is not None else 0) + self.rotation) % workers
        rank, world_size = self.settings["rank"], self.settings["world_size"]
        stream = ReaderStream(
            self.settings, rank * workers + worker, world_size * workers, self.positions[worker]
        )
        for batch, position in stream.batches():
            batch["_worker"] = worker
            batch["_position"] = position
            yield batch


# --------------------------------------------------------------------------------------------
# the per-rank streams


class WebDatasetStream:
    """A rank's endless, resumable stream of batches from WebDataset shards."""

    def __init__(self, data_config, rank: int, world_size: int, micro_batch_size: int, seed: int):
        sources = [expand_urls(pattern) for pattern in data_config.urls]
        weights = list(data_config.weights) or [1.0] * len(sources)
        self.num_workers = data_config.num_workers
        self.settings = {
            "sources": sources,
            "weights": weights,
            "sample_kind": data_config.sample_kind,
            "caption_key": data_config.caption_key,
            "resolution": data_config.resolution,
            "aspect_buckets": list(data_config.aspect_buckets),
            "shuffle_buffer": data_config.shuffle_buffer,
            "shuffle_shards": data_config.shuffle_shards,
            "max_bad_fraction": data_config.max_bad_fraction,
            "read_timeout_seconds": data_config.read_timeout_seconds,
            "micro_batch_size": micro_batch_size,
            "seed": seed,
            "rank": rank,
            "world_size": world_size,
        }
        epoch_samples = data_config.epoch_samples or indexed_sample_count(
            [url for urls in sources for url in urls]
        )
        self.batches_per_epoch = (
            max(1, epoch_samples // (world_size * micro_batch_size)) if epoch_samples else None
        )
        self.batches = 0
        self.positions: list[dict | None] = [None] * max(1, self.num_workers)

    @property
    def epoch(self) -> int | None:
        """Epochs completed (batches // batches_per_epoch); None when the length is unknown."""
        return None if self.batches_per_epoch is None else self.batches // self.batches_per_epoch

    def _fingerprint(self) -> str:
        # settings that do not change which samples come in which order
        ignored = ("rank", "max_bad_fraction", "read_timeout_seconds")
        described = {k: v for k, v in self.settings.items() if k not in ignored}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "kind": "webdataset",
            "rank": self.settings["rank"],
            "world_size": self.settings["world_size"],
            "num_workers": self.num_workers,
            "fingerprint": self._fingerprint(),
            "batches": self.batches,
            "positions": copy.deepcopy(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.state_dict(), ("kind", "rank", "world_size", "num_workers"))
        if state["fingerprint"] != self._fingerprint():
            raise DataStateError(
                "the saved data stream state belongs to other data settings (urls, weights, "
                "sample kind, resolution, buckets, shuffling, micro-batch size or seed changed): "
                "restore the run's data settings, or start the data stream from the beginning"
            )
        self.batches = state["batches"]
        self.positions = copy.deepcopy(state["positions"])

    def stats(self) -> dict:
        """Samples seen, bad and dropped by bucketing, summed over this rank's workers."""
        totals = {"seen": 0, "bad": 0, "dropped": 0}
        for position in self.positions:
            if position is not None:
                for name in totals:
                    totals[name] += position["stats"][name]
        return totals

    def __iter__(self) -> Iterator[dict]:
        workers = len(self.positions)
        dataset = _WorkerDataset(self.settings, list(self.positions), self.batches % workers)
        if self.num_workers == 0:
            loader: Any = dataset
        else:
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=PREFETCH_BATCHES,
            )
        for batch in loader:
            worker = batch.pop("_worker")
            self.positions[worker] = batch.pop("_position")
            self.batches += 1
            yield batch


class GeneratedStream:
    """A stream whose batch b is a pure function of (seed, rank, b): its whole position is the
    number of batches taken. Subclasses set `kind` and `batches_per_epoch`."""

    kind = ""

    def __init__(self, data_config, rank: int, world_size: int, micro_batch_size: int, seed: int):
        self.config, self.rank, self.world_size = data_config, rank, world_size
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.batches = 0
        self.batches_per_epoch = 1

    @property
    def epoch(self) -> int:
        return self.batches // self.batches_per_epoch

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "rank": self.rank,
            "world_size": self.world_size,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self.state_dict(), ("kind", "rank", "world_size"))
        self.batches = state["batches"]


class SyntheticStream(GeneratedStream):
    """Scenes of the synthetic compositional dataset, generated on the fly (no workers).

    Row i of batch b on rank r is scene ((b * world_size + r) * micro_batch_size + i) modulo
    `synthetic_size`, so an epoch is synthetic_size / (world_size * micro_batch_size) batches.
    """

    kind = "synthetic"

    def __init__(self, data_config, rank: int, world_size: int, micro_batch_size: int, seed: int):
        super().__init__(data_config, rank, world_size, micro_batch_size, seed)
        self.batches_per_epoch = max(
            1, data_config.synthetic_size // (world_size * micro_batch_size)
        )

    def batch(self, batch_index: int) -> dict:
        from apex_dist.data.synthetic import make_scene, render_scene

        first = (batch_index * self.world_size + self.rank) * self.micro_batch_size
        indices = [
            (first + row) % self.config.synthetic_size for row in range(self.micro_batch_size)
        ]
        specs = [make_scene(index, self.seed) for index in indices]
        batch: dict[str, Any] = {
            "key": [f"synthetic-{index:09d}" for index in indices],
            "prompt": [spec["caption"] for spec in specs],
            "metadata": [{"caption": spec["caption"], "spec": spec} for spec in specs],
        }
        if self.config.sample_kind == "image_text":
            images = [render_scene(spec, self.config.resolution) for spec in specs]
            pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
            batch["image"] = pixels.float() / 127.5 - 1.0
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch(self.batches)
            self.batches += 1
            yield batch


class ToyStream(GeneratedStream):
    """The 2-D toy (apex_dist.data.toy): batches in the objectives' format.

    Batch b on rank r is drawn from the toy's data pool with a generator seeded by (seed, r, b).
    """

    kind = "toy"

    def __init__(self, data_config, rank: int, world_size: int, micro_batch_size: int, seed: int):
        from apex_dist.data.toy import POOL_SIZE, DataPool

        super().__init__(data_config, rank, world_size, micro_batch_size, seed)
        self.pool = DataPool(POOL_SIZE, torch.Generator().manual_seed(seed))
        self.batches_per_epoch = max(1, POOL_SIZE // (world_size * micro_batch_size))

    def __iter__(self) -> Iterator[dict]:
        while True:
            seed = int.from_bytes(
                hashlib.sha256(f"{self.seed}:{self.rank}:{self.batches}".encode()).digest()[:8],
                "little",
            )
            generator = torch.Generator().manual_seed(seed)
            batch = self.pool.batch(self.micro_batch_size, generator, self.config.text_dropout)
            batch["key"] = [
                f"toy-{self.rank}-{self.batches}-{row}" for row in range(self.micro_batch_size)
            ]
            self.batches += 1
            yield batch


def _check_state(state: dict, current: dict, names: tuple[str, ...]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataStateError(
            f"not a data stream state of format {STATE_FORMAT} (got {type(state).__name__} "
            f"with format {state.get('format') if isinstance(state, dict) else None})"
        )
    for name in names:
        if state.get(name) != current[name]:
            raise DataStateError(
                f"the saved data stream state has {name}={state.get(name)!r} but this stream has "
                f"{name}={current[name]!r}: resume with the same {name} (the stream position is "
                "per rank and per worker), or start the data stream from the beginning"
            )


def build_stream(data_config, rank: int, world_size: int, micro_batch_size: int, seed: int):
    """The stream of `data_config.kind` for one rank (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got rank {rank}, world {world_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
    streams = {"webdataset": WebDatasetStream, "synthetic": SyntheticStream, "toy": ToyStream}
    if data_config.kind not in streams:
        raise ValueError(f"data.kind {data_config.kind!r} is unknown: one of {', '.join(streams)}")
    return streams[data_config.kind](data_config, rank, world_size, micro_batch_size, seed)
