"""The one elastic mechanism: subnet specs, the grid and its sampler, elastic layers."""
from poa_keras.elastic.layers import (ElasticAttention, ElasticBlock, ElasticDense,
                                      ElasticLayerNorm, ElasticLayerScale, ElasticMLP,
                                      ElasticPatchEmbed, StochasticDepth, alpha,
                                      assign_by_path, block_boundaries, fold_alpha,
                                      set_block_boundaries, weights_by_path)
from poa_keras.elastic.conv import ElasticBottleneck, ElasticConv2D, ElasticGroupNorm
from poa_keras.elastic.sampler import SubnetSampler
from poa_keras.elastic.spec import (IntactSubnet, ResNetSubnet, SwinSubnet, ViTSubnet, block_ids,
                                    grid_values, selection_weights)

__all__ = [
    "ElasticAttention", "ElasticBlock", "ElasticBottleneck", "ElasticConv2D", "ElasticDense",
    "ElasticGroupNorm", "ElasticLayerNorm", "ElasticLayerScale",
    "ElasticMLP", "ElasticPatchEmbed", "IntactSubnet", "ResNetSubnet", "StochasticDepth",
    "SubnetSampler", "SwinSubnet", "ViTSubnet",
    "alpha", "assign_by_path", "block_boundaries", "block_ids", "fold_alpha", "grid_values",
    "selection_weights", "set_block_boundaries", "weights_by_path",
]
