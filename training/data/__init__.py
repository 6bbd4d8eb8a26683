"""The input pipeline, one concern per module, importing one way: files -> bad_images -> sampling -> sources -> workers
-> cpu_path -> the device path (device_autoaugment, device_params, device_decode, device_geometry, device_color,
device_path) -> decode_choice -> loaders, the one place that picks the path and builds the loaders. The rest of the
project imports from here."""
from .bad_images import BadImageReport
from .decode_choice import choice_line, choose_share
from .device_autoaugment import OPS as AUTO_AUGMENT_OPS
from .device_autoaugment import apply_ops as apply_auto_augment_ops
from .files import REASONS, BadImage, open_rgb
from .loaders import (Loaders, build_loaders, create_eval_loader, create_random_erasing, create_train_loader,
                      data_config, data_configs, resolve_input_path)
from .sampling import (STEP, SWA_BN, BatchLayout, EvalBatchSampler, ImageSizes, TrainBatchSampler, derive_seed,
                       epoch_steps, image_sizes, seed_all, seed_sample)
from .sources import (BUILTIN_ROOT, Datasets, LazyImageFolder, classes_of, image_samples, locate_dataset,
                      open_datasets, open_image_folder, read_manifest)

__all__ = ['AUTO_AUGMENT_OPS', 'apply_auto_augment_ops', 'BadImageReport', 'choice_line', 'choose_share',
           'resolve_input_path', 'epoch_steps', 'REASONS', 'BadImage', 'open_rgb', 'Loaders', 'build_loaders',
           'create_eval_loader', 'create_random_erasing', 'create_train_loader', 'data_config', 'data_configs', 'STEP',
           'SWA_BN', 'BatchLayout', 'EvalBatchSampler', 'ImageSizes', 'TrainBatchSampler', 'derive_seed', 'image_sizes',
           'seed_all', 'seed_sample', 'BUILTIN_ROOT', 'Datasets', 'LazyImageFolder', 'classes_of', 'image_samples',
           'locate_dataset', 'open_datasets', 'open_image_folder', 'read_manifest']
