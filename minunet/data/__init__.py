"""Everything the training pipeline needs besides the network, one concept per module:

* :mod:`minunet.data.synthetic` -- EM-like and touching-cell images, generated from a seed.
* :mod:`minunet.data.weights`   -- the paper's weight map (eq. 2) and the 1-pixel gaps between cells.
* :mod:`minunet.data.elastic`   -- elastic deformation and the other augmentations (Section 3.1).
* :mod:`minunet.data.tiling`    -- mirror padding and overlap-tile prediction (Fig. 2).
* :mod:`minunet.data.io`        -- PNG/TIFF reading and writing, intensity normalisation,
  :func:`standardize` (what the network sees).
* :mod:`minunet.data.dataset`   -- data folders, the validation split, random training tiles.

The metrics live next door in :mod:`minunet.metrics`.
"""
from minunet.data.dataset import (Sample, TileSampler, count_classes, load_folder, make_sample,
                                  split_train_val, synthetic_samples)
from minunet.data.elastic import displacement_field, elastic_deform, random_augment
from minunet.data.io import image_files, read_image, read_slices, standardize, write_image
from minunet.data.synthetic import cell_images, em_images
from minunet.data.tiling import mirror_pad, predict_overlap_tile, tile_origins
from minunet.data.weights import (class_balance_weights, instance_targets, semantic_weight_map,
                                  separate_touching, unet_weight_map)

__all__ = [
    "Sample", "TileSampler", "count_classes", "load_folder", "make_sample", "split_train_val",
    "synthetic_samples",
    "displacement_field", "elastic_deform", "random_augment",
    "image_files", "read_image", "read_slices", "standardize", "write_image",
    "cell_images", "em_images",
    "mirror_pad", "predict_overlap_tile", "tile_origins",
    "class_balance_weights", "instance_targets", "semantic_weight_map", "separate_touching",
    "unet_weight_map",
]
