"""Full-size UNet configs (UNetModel kwargs) as the host's model_detection spells them, for the
benchmarks that build SD1.5 and SDXL with random weights (bench/sampling.py, bench/training.py)."""

_COMMON = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
               legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
SD15 = dict(_COMMON, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
            transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_linear_in_transformer=False,
            context_dim=768, num_heads=8, adm_in_channels=None)
SDXL = dict(_COMMON, num_classes="sequential", adm_in_channels=2816, model_channels=320, num_res_blocks=[2, 2, 2],
            transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
            use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
# --quick: the tiny SD1 of tests/support/tiny_nodes.py, and Segmind-Vega (SDXL family, 745M parameters).
SD15_TINY = dict(_COMMON, model_channels=320, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768, num_heads=8,
                 num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None)
SDXL_VEGA = dict(SDXL, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=0,
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2])
