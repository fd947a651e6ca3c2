"""The typed config schema. The keys every run has are declared here, with their type and
default; the sections of the chosen dataset, of each model's adapter and of every loss term are
declared by the registries (each entry's `Config` dataclass / sections) and joined to these by
`run_schema` when a config is composed, so a plugin's section is typed and checked like a
built-in one, and a spec holds only the sections of its own adapter.

Configs are merged onto `OmegaConf.structured(run_schema(...))`, so an unknown key or a value
of the wrong type fails at start-up naming the key. Range and cross-field checks live in each
section's `check` and in `mmkd.config.validate`.
"""

# OmegaConf reads these annotations at run time: keep typing.Optional/List/Dict here.
# ruff: noqa: UP006, UP035, UP045

from dataclasses import dataclass, field, make_dataclass
from typing import Any, ClassVar, Dict, List, Optional

# each adapter family declares its sections beside its code, in light modules (no model library)
from mmkd.adapters import adapter_sections
from mmkd.data import dataset_sections
from mmkd.data.av_digits import AvDigitsCfg
from mmkd.data.demo import DemoCfg
from mmkd.data.folder import FolderCfg
from mmkd.data.fsdd import FsddCfg
from mmkd.data.hf import HfCfg
from mmkd.data.manifest import ManifestCfg
from mmkd.data.mnist import MnistCfg
from mmkd.data.webdataset import WebDatasetCfg
from mmkd.losses import term_classes
from mmkd.settings import Settings

# each dataset's section lives beside its code (mmkd.data.<name>); named here for old imports
DATASET_CONFIGS = (
    AvDigitsCfg,
    DemoCfg,
    FolderCfg,
    FsddCfg,
    HfCfg,
    ManifestCfg,
    MnistCfg,
    WebDatasetCfg,
)

# --------------------------------------------------------------------------- adapters


@dataclass
class HeadCfg:
    """Projection into the shared space (L2-normalised) and an optional classifier."""

    # shared-space dimension. None: a student takes its teacher's; a model without a teacher
    # (or a teacher) uses its encoder's feature dimension with no projection
    embed_dim: Optional[int] = None
    hidden_dim: Optional[int] = None  # None: linear projection; else a 2-layer MLP
    classifier: bool = True  # add a classification head on the pooled features
    num_classes: Optional[int] = None  # None: taken from the dataset at start-up
    dropout: float = 0.0


@dataclass
class AdapterSpec:
    """One model: preprocessing + encoder + head. `adapter` picks the implementation; the
    sections it reads (`student.timm`, `student.image`, ...) are added by `adapter_schema`."""

    # registry name: image | text | text_rnn | audio_cnn | audio_timm | audio_wav2vec2 |
    # audio_hubert | crepe
    adapter: str = "image"
    # a run's exported model folder (DIR/student) or a .safetensors file of this adapter's state
    weights: Optional[str] = None
    freeze_encoder: bool = False  # train only the head (LiT / ImageBind locked tower)
    # intermediate features every forward pass also returns (AdapterOutput.layers), by the
    # model's own names: timm feature_info modules, hidden_states.N, layers.N, blockN. Loss terms
    # ask for the layers of their `pairs` themselves; a wrong name fails at start-up
    features: List[str] = field(default_factory=list)
    head: HeadCfg = field(default_factory=HeadCfg)


def adapter_schema(
    adapter: str, key: str = "student.adapter", losses: Optional[type] = None
) -> type[AdapterSpec]:
    """`AdapterSpec` with the sections adapter `adapter` reads (from the adapter config
    registry, `mmkd.adapters.adapter_sections`), and only those: a section of another adapter
    is an unknown key. With `losses` (a losses schema), a `TeacherSpec` of several teachers.
    `key` names the spec's `adapter` in the error for an unknown name."""
    sections = [
        (name, cls, field(default_factory=cls))
        for name, cls in adapter_sections(adapter, key).items()
    ]
    if losses is None:
        return make_dataclass("AdapterSpec", sections, bases=(AdapterSpec,))
    teacher = [*sections, ("losses", losses, field(default_factory=losses))]
    return make_dataclass("TeacherSpec", teacher, bases=(TeacherSpec,))


# --------------------------------------------------------------------------- data


@dataclass
class FramesCfg(Settings):
    """Audio read as fixed windows with a hop (mmkd.data.frames): each window is a sample
    `CLIP_ID@OFFSET`; labels are dropped."""

    positive: ClassVar = ("window", "hop", "sample_rate", "cache_clips")

    window: Optional[int] = None  # samples per frame at sample_rate; None: whole clips
    hop: int = 512  # samples between frame starts
    sample_rate: int = 16000  # clips are downmixed and resampled to this rate
    cache_clips: int = 16  # decoded clips kept per process (least recently used out first)


@dataclass
class DataCfg(Settings):
    """The settings of every dataset. `run_schema` adds the section(s) of the chosen one
    (`data.<name>`, its registered `Config`), and only those: a section of another dataset is
    an unknown key."""

    positive: ClassVar = ("batch_size", "decode_cache_max_gb")
    non_negative: ClassVar = ("num_workers", "max_train_samples", "max_eval_samples")
    choices: ClassVar = {"on_error": ("raise", "skip")}
    paths: ClassVar = ("root",)

    # dataset registry name: demo | manifest | folder | fsdd | mnist | av_digits | webdataset | hf
    name: str = "demo"
    root: Optional[str] = (
        None  # shared data folder; fsdd/mnist roots default to ROOT/fsdd/recordings, ROOT/mnist
    )
    batch_size: int = 64
    eval_batch_size: Optional[int] = None  # None: batch_size
    # DataLoader worker processes; None: chosen from the core count and the measured cost of
    # preparing a batch (mmkd.data.workers; the choice is logged at start-up)
    num_workers: Optional[int] = None
    # decode each sample once into memory-mapped arrays (mmkd.data.decode_cache): auto (on for
    # file-backed data when it fits: <= 25% of RAM and 50% of free disk) | true | false
    decode_cache: str = "auto"
    decode_cache_dir: Optional[str] = None  # None: $MMKD_CACHE_DIR/decoded or ~/.cache/mmkd/decoded
    decode_cache_max_gb: Optional[float] = 20.0  # refuse a larger decoded split (None: no limit)
    train_labels: bool = True  # false: labels of the training split never reach the loss
    val_fraction: float = 0.1  # held out from train when a dataset has no validation split
    max_train_samples: Optional[int] = None  # deterministic random subset, for quick runs
    # which subsets max_train_samples / max_eval_samples keep; None: run.seed
    subset_seed: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # text prompt per class: for the text side of paired data and zero-shot evaluation
    prompt_template: str = "{name}"
    on_error: str = "raise"  # raise | skip (skipped samples are counted in the log and metrics)
    # decode every validation and test sample at start-up, so a bad file fails before training
    check_eval_data: bool = True
    # training batches of texts of similar token counts (less padding): the epoch's shuffled
    # order in pools of 50 batches, each sorted by length, the batches shuffled (seeded)
    bucket_by_length: bool = False
    frames: FramesCfg = field(default_factory=FramesCfg)  # any audio dataset read as frames


# --------------------------------------------------------------------------- losses


def losses_schema() -> type:
    """Weighted loss terms, one section per term of the registry (mmkd.losses), plugin terms
    included: `losses.<term>` holds its `weight` (0: not computed) and its own settings.
    total = sum(weight * term)."""
    return make_dataclass(
        "LossesCfg",
        [(cls.name, cls.Config, field(default_factory=cls.Config)) for cls in term_classes()],
    )


# the built-in terms' sections (a run's schema is built by `run_schema`, plugin terms included)
LossesCfg = losses_schema()


@dataclass
class TeacherSpec(AdapterSpec):
    """One of several teachers (`teachers.NAME`): a model spec plus the loss terms that
    compare the student(s) with this teacher."""

    losses: LossesCfg = field(default_factory=LossesCfg)  # type: ignore[valid-type]


# --------------------------------------------------------------------------- optimisation & run


@dataclass
class OptimCfg:
    """Optimizer and learning-rate schedule."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine (linear warmup + cosine decay) | constant (warmup then flat)
    warmup_fraction: float = 0.05  # fraction of all training steps spent warming up
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr


@dataclass
class StoreCfg:
    """Teacher outputs stored for K augmented views of every training sample (mmkd.store)."""

    # K views per training sample; None: no store (live teacher) unless distill.cache=true (K=1)
    views: Optional[int] = None
    view_order: str = "cycle"  # cycle: epoch e reads view e mod K | random: seeded draw per epoch
    seed: int = 0  # augmentation seed of the stored views; fixed, so runs of any run.seed share it
    dtype: str = "float32"  # float32 | float16 | bfloat16: how embeddings and logits are stored
    logits_topk: Optional[int] = None  # keep only the top-k logits (KD renormalised over them)
    chunk_size: int = 4096  # samples per chunk: a killed build resumes at the first missing one
    max_gb: Optional[float] = 20.0  # refuse to build a store larger than this (None: no limit)


@dataclass
class DistillCfg:
    cache: bool = False  # store the teacher's outputs once (distill.store with views=1)
    cache_dir: Optional[str] = None  # where stores live; None: RUN_DIR/teacher_cache
    store: StoreCfg = field(default_factory=StoreCfg)
    compile_student: bool = False  # torch.compile the student(s)
    nonfinite_loss: str = "stop"  # stop | skip: what a NaN/Inf loss does


@dataclass
class TrainerCfg:
    """Passed to pytorch_lightning.Trainer; `extra` takes any other Trainer argument."""

    max_epochs: int = 1
    max_steps: int = -1
    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | ...
    # None leaves a setting to Lightning's default (and keeps its log quiet about it)
    limit_train_batches: Any = None  # int (batches) or float (fraction)
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    val_check_interval: Any = None
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = None
    accumulate_grad_batches: int = 1
    num_sanity_val_steps: int = 0
    deterministic: Any = False
    enable_progress_bar: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RunCfg:
    """Where a run writes, how it is seeded, resumed, tested and logged."""

    seed: int = 0
    dir: Optional[str] = None  # output folder; None: runs/<name>-<timestamp>
    name: str = "default"  # the experiment name (set by experiment=NAME)
    resume: bool = False  # continue from DIR/checkpoints/last.ckpt
    test: bool = True  # test the final student (and teacher) after fitting
    export: bool = True  # write DIR/student
    latency_seconds: float = 1.0  # time spent timing each model for the CPU latency figure
    checkpoint_every_n_steps: Optional[int] = None  # None: checkpoint at the end of each epoch
    # a folder laid out like configs/ (experiment/, student/, ...) searched before mmkd's own
    config_path: Optional[str] = None
    # modules imported at start-up so the adapters / datasets they register can be named; configs
    # never import anything else (installed plugins can also use the mmkd.adapters /
    # mmkd.datasets entry point groups, loaded only when their name is used)
    plugins: List[str] = field(default_factory=list)
    # Lightning loggers: csv (RUN_DIR/logs/metrics.csv) | tensorboard | mlflow | wandb
    loggers: List[str] = field(default_factory=lambda: ["csv"])
    # None: a local MLflow file store in RUN_DIR/logs/mlruns; else any MLflow tracking URI
    mlflow_tracking_uri: Optional[str] = None
    wandb_project: Optional[str] = None  # None: the run's name
    wandb_offline: bool = True  # W&B writes RUN_DIR/logs/wandb only; false: sync to the server


@dataclass
class Config:
    """A whole run: data, teacher, student(s), losses, optimisation, trainer and run settings."""

    data: DataCfg = field(default_factory=DataCfg)
    teacher: Optional[AdapterSpec] = None  # None: no teacher (supervised training)
    # several teachers, each with its own loss terms (teachers.NAME.losses); `teacher` with the
    # top-level `losses` is the one-teacher shorthand. Label terms (ce) stay in `losses`
    teachers: Dict[str, TeacherSpec] = field(default_factory=dict)
    student: AdapterSpec = field(default_factory=AdapterSpec)
    # more students trained against the same teacher (e.g. audio and image into a text space)
    extra_students: Dict[str, AdapterSpec] = field(default_factory=dict)
    losses: LossesCfg = field(default_factory=LossesCfg)  # type: ignore[valid-type]
    optim: OptimCfg = field(default_factory=OptimCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    run: RunCfg = field(default_factory=RunCfg)


def data_schema(dataset: str) -> type[DataCfg]:
    """`DataCfg` with the section(s) dataset `dataset` reads (its own `data.<dataset>`, and
    those of the datasets it reads), from the dataset registry."""
    return make_dataclass(
        "DataCfg",
        [
            (name, cls, field(default_factory=cls))
            for name, cls in dataset_sections(dataset).items()
        ],
        bases=(DataCfg,),
    )


def run_schema(dataset: str = "demo", adapters: Optional[Dict[str, str]] = None) -> type[Config]:
    """The schema of a run on dataset `dataset` whose models use `adapters` (model key ->
    adapter name, for `teacher`, `student`, `teachers.NAME` and `extra_students.NAME`; default:
    an image student, no teacher): `Config` with the sections of that dataset, of each model's
    adapter, and of every registered loss term (import plugins first, so theirs are included)."""
    adapters = {"student": AdapterSpec.adapter} if adapters is None else adapters
    losses = losses_schema()
    data = data_schema(dataset)

    def spec(key: str, teacher_losses: Optional[type] = None) -> type[AdapterSpec]:
        return adapter_schema(
            adapters.get(key, AdapterSpec.adapter), f"{key}.adapter", teacher_losses
        )

    def named(group: str, teacher_losses: Optional[type] = None) -> Dict[str, type]:
        prefix = f"{group}."
        names = [key[len(prefix) :] for key in adapters if key.startswith(prefix)]
        return {name: spec(f"{prefix}{name}", teacher_losses) for name in names}

    teachers, extra_students = named("teachers", losses), named("extra_students")
    teacher = (
        field(default_factory=spec("teacher")) if "teacher" in adapters else field(default=None)
    )
    return make_dataclass(
        "Config",
        [
            ("data", data, field(default_factory=data)),
            ("teacher", Optional[AdapterSpec], teacher),
            ("student", AdapterSpec, field(default_factory=spec("student"))),
            (
                "teachers",
                Dict[str, TeacherSpec],
                field(default_factory=lambda: {n: cls() for n, cls in teachers.items()}),
            ),
            (
                "extra_students",
                Dict[str, AdapterSpec],
                field(default_factory=lambda: {n: cls() for n, cls in extra_students.items()}),
            ),
            ("losses", losses, field(default_factory=losses)),
        ],
        bases=(Config,),
    )
