# Craft's make targets. `make devices`: the emulated-ARM device check (scripts/devices/README.md).
.PHONY: devices devices-ort-sweep

# aarch64 + armv7 under qemu-user: same greedy tokens as x86_64, small int8 under a Pi Zero 2 W cap.
# Exit 77 (make reports an error) = skipped: qemu-user-static / debootstrap cannot be installed.
devices:
	scripts/devices/check.sh

# Every onnxruntime minor since 1.15 on emulated aarch64 with the tiny int8 artifact (~2 min).
devices-ort-sweep:
	scripts/devices/check.sh --ort-sweep
