"""TrainState: everything besides the DeepSpeed shards that a resumed run needs."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional

__all__ = ["TrainState"]


@dataclasses.dataclass
class TrainState:
    """Position of a run. ``step`` counts optimizer steps taken; the data position is
    ``micro_batch = step * grad_accum`` (checkpoints are only taken at optimizer-step boundaries)."""

    stage: str
    step: int = 0
    samples_seen: int = 0            # global (all ranks) labeled/MAE samples consumed
    data_epoch: int = 0              # epoch of the next micro-batch
    micro_batch: int = 0             # this rank's next micro-batch index (data position)
    seeds: Dict[str, int] = dataclasses.field(default_factory=dict)
    corrupt_samples: int = 0         # corrupt samples skipped so far (all ranks)
    best_eval: Optional[float] = None  # the best eval.best_metric so far (evaluation while training) ...
    best_step: int = 0               # ... and the step whose weights are in export/best/
    num_ranks: int = 0               # ranks of the run that saved it (0: unknown, an older checkpoint)
    data_order: str = ""             # its data.order ("resampled" / "shards"; "": an older checkpoint)
    virtual_slots: int = 0           # its slots (data.order "shards")

    def advance(self, grad_accum: int, batches_per_epoch: int, global_batch: int) -> None:
        """One optimizer step taken: ``grad_accum`` micro-batches of this rank, ``global_batch`` samples of all."""
        self.step += 1
        self.micro_batch += grad_accum
        self.data_epoch = self.micro_batch // batches_per_epoch
        self.samples_seen += global_batch

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        d: Dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
