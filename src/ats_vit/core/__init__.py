"""The algorithm and what every reducer shares: scoring, sampling, the token batch, the block
kernels, MAC counting and the per-forward statistics. Pure tensor functions over explicit
records; nothing here knows a host library's model classes.

Glossary (one name per idea):

- ``num_tokens``: the user's budget of a reduction block: None (the input's patch count, the
  released ATS), an int, a fraction of the entering patch tokens, or a list, one per block.
- ``k``: what a block's ``num_tokens`` resolves to for a batch: an int, or a (B,) tensor, one per
  image (ATS draws ``k`` grid points and keeps K' <= k distinct tokens). ToMe's merge count ``r``
  exists only inside ToMe.
- prefix tokens (``num_prefix``): class, distillation and register tokens, never dropped.
- ``positions``: a kept token's index on the input's patch grid (row-major), -1 on padding.
- layout: where each image's tokens sit in a flat token tensor, packed or padded.
"""
