"""The public API in one import, as `fastai.vision.all` is fastai's: `from fastai_cds.all import *` binds exactly the names
the README and the docs teach, each to one object. Everything else stays importable from its module (e.g.
`fastai_cds.losses.instance_ids`); the recipes' plumbing is `fastai_cds.recipe`, the benchmarks' `fastai_cds.benchmark`."""
from .losses import SupConLoss, embedding_distance, soft_target_loss, pairwise_kl
from .stages import StageInfo, find_stages, to_nchw
from .heads import L2Norm, ConvTrunk, SepConvHead, MLPHead, AuxClassifier, reference_init
from .model import Taps, DeepSupervisionModel
from .export import plain_learner
from .checkpoints import load_checkpoint
from .backbone import backbone_state, export_backbone
from .callback import ScopedCallback
from .views import (RandomResizedCropBatch, PadCropFlip, RandomGrayscale, ColorJitterBatch, Cutout, simclr_tfms,
                    PresizeItems, Views, reference_views, two_view_dl, show_views)
from .core import LossTerms, set_loss, LossTermCallback, DeepSupervisionCallback, FiniteLossCallback
from .semi import stratified_fraction, split_labelled, SemiSupervisedCallback
from .distill import (Teacher, load_teacher, Distiller, reference_distillation, DistillCallback, TeacherCallback, KDCallback,
                      pair_stages, FeatureDistillCallback)
from .stage_distill import FitNetCallback, ATCallback, SPCallback
from .embedding_distill import RKDCallback, CRDCallback, item_index_dls, distill_callbacks
from .cds import CDSCallback
from .baselines import DSNCallback, DKSCallback, DHMCallback, method_callbacks
from .precision import DeviceMixedPrecision, to_mixed_precision
from .compile import compile_model, CompileCallback
from .digits import digits_items, digits_stats, digits_dls
from .tensor_data import TensorImages, TensorImageDL, tensor_dls, folder_tensor_dls
from .metrics import calibration_bins, ece, ExpectedCalibrationError, plot_reliability, BestMetrics
from .architectures import small_cnn, get_arch, cifar_stem, reference_stem, cifar_resnet, cifar_model, shufflenet_v1
from .schedule import step_schedule
from .parallel import init_distributed, distributed
from .resume import CheckpointCallback, checkpointing

__all__ = [n for n in dir() if not n.startswith('_')]  # the names imported above
