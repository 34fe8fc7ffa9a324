"""Greedy-token agreement of int8 weights (`BarkHfModel.quantize_int8`) with float32, stage by stage.

Each stage of both models gets the same float32 input, so a difference is that stage's own.
Random weights of the bark-small shape, nothing downloaded; about 2 minutes on one CPU thread:

    PYTHONPATH=. OMP_NUM_THREADS=1 TQDM_DISABLE=1 python benchmarks/int8_agreement.py --semantic-tokens 150
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from bark_hf import BarkHfCoarseConfig, BarkHfConfig, BarkHfFineConfig, BarkHfModel, BarkHfSemanticConfig

SMALL_SHAPE = dict(num_layers=12, num_heads=12, hidden_size=768, bias=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--semantic-tokens", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    config = BarkHfConfig(semantic_config=BarkHfSemanticConfig(**SMALL_SHAPE),
                          coarse_acoustics_config=BarkHfCoarseConfig(**SMALL_SHAPE),
                          fine_acoustics_config=BarkHfFineConfig(**SMALL_SHAPE))
    full = BarkHfModel(config).eval()
    int8 = copy.deepcopy(full).quantize_int8()
    text = torch.randint(0, 100, (1, 256))
    mask = torch.ones_like(text)
    n = args.semantic_tokens

    semantic = [m.semantic.generate(text, mask, None, allow_early_stop=False, max_new_tokens=n, top_k=1)
                for m in (full, int8)]
    same = (semantic[0].sequences == semantic[1].sequences)[0]
    first = int((~same).nonzero()[0]) if (~same).any() else n
    print(f"semantic: {same.float().mean():.1%} of {n} tokens equal; first difference at token {first}")

    reference = semantic[0]
    coarse = [m.coarse_acoustics.generate(reference.sequences, reference.lengths, None, top_k=1) for m in (full, int8)]
    same = coarse[0].sequences == coarse[1].sequences
    print(f"coarse (same semantic input): {same.float().mean():.1%} of {same.numel()} tokens equal")

    reference = coarse[0]
    fine = [m.fine_acoustics.generate(reference.sequences, reference.lengths, None, temperature=None)
            for m in (full, int8)]
    same = fine[0].sequences[:, 2:] == fine[1].sequences[:, 2:]
    print(f"fine (same coarse input, codebooks 3-8): {same.float().mean():.1%} of {same.numel()} codes equal")


if __name__ == "__main__":
    main()
