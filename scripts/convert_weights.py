"""Convert network weights between the released files, diffusers folders, our checkpoints and safetensors.

    python scripts/convert_weights.py --stage c --src model_v2_stage_c.pt --dst stage_c.safetensors --to wuerstchen
    python scripts/convert_weights.py --stage b --src model_v2_stage_b.pt --dst stage_b_diffusers --to diffusers
    python scripts/convert_weights.py --stage effnet --src model_v2_stage_b.pt --dst effnet.safetensors --to wuerstchen

``--to wuerstchen`` writes safetensors in the released key layout (``StageX.load_state_dict`` takes it as it is),
with the model config in the metadata; ``--to diffusers`` writes a folder for the diffusers class's
``from_pretrained``. The source format is detected; EMA weights are taken when the source has them (``--no-ema``).
"""

from __future__ import annotations

import argparse
import json

from wuerstchen.weights import STAGES, load_network, save_diffusers, save_wuerstchen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=sorted(STAGES))
    parser.add_argument("--src", required=True, help="released .pt, diffusers folder, .safetensors or our .ckpt")
    parser.add_argument("--dst", required=True, help="output .safetensors file (wuerstchen) or folder (diffusers)")
    parser.add_argument("--to", required=True, choices=("wuerstchen", "diffusers"))
    parser.add_argument("--config", type=json.loads, default=None,
                        help="model config as JSON, for sources that carry none and match no full-size layout")
    parser.add_argument("--no-ema", action="store_true", help="take the raw weights even when EMA weights exist")
    args = parser.parse_args(argv)

    try:
        network, config = load_network(args.stage, args.src, args.config, prefer_ema=not args.no_ema)
        state = network.state_dict()
        if args.to == "wuerstchen":
            save_wuerstchen(state, args.stage, config, args.dst)
        else:
            save_diffusers(state, args.stage, config, args.dst)
    except (ValueError, KeyError, FileNotFoundError) as exn:
        parser.exit(2, f"error: {exn}\n")
    count = sum(v.numel() for v in network.parameters())
    print(f"stage {args.stage}: {count:,} parameters, config {json.dumps(config)} -> {args.dst} ({args.to})")


if __name__ == "__main__":
    main()
