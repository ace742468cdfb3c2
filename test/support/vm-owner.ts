/**
 * A process that starts a VM and waits (the VM tests kill it to show QEMU dies with its owner).
 * argv: GUEST_DIR RUN_DIR ROOT_DISK SCRATCH_DISK
 */
import { loadGuestAssets } from "../../src/vm/guest-assets.js";
import { QemuVm } from "../../src/vm/qemu-vm.js";

const [guestDir, runDir, rootDisk, scratchDisk] = process.argv.slice(2);
if (!guestDir || !runDir || !rootDisk || !scratchDisk)
  throw new Error("usage: vm-owner GUEST_DIR RUN_DIR ROOT SCRATCH");
const assets = await loadGuestAssets(guestDir);
if (!assets) throw new Error(`no guest in ${guestDir}`);
await QemuVm.start({ assets, runDir, rootDisk, scratchDisk, bootTimeoutMs: 600_000 });
setInterval(() => {}, 1000);
