import { execFileSync } from "node:child_process";
import { chmod, copyFile, mkdir, symlink, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { ensureGuestAssets, type GuestAssets } from "../../src/vm/guest-assets.js";

/** The guest VM tests boot: built (once; later runs find it up to date) where install.sh puts it. */
export function testGuestAssets(): Promise<GuestAssets> {
  return ensureGuestAssets(process.env.BERTH_VM_DIR ?? join(homedir(), ".cache", "berth", "vm"));
}

/** A busybox root folder (every applet in /bin, /etc/passwd, /tmp 1777) with `files` added (path → content). */
export async function busyboxRootFolder(root: string, files: Record<string, string> = {}): Promise<void> {
  await mkdir(join(root, "bin"), { recursive: true });
  await mkdir(join(root, "etc"), { recursive: true });
  await mkdir(join(root, "tmp"), { recursive: true });
  await chmod(join(root, "tmp"), 0o1777);
  await copyFile("/bin/busybox", join(root, "bin", "busybox"));
  await chmod(join(root, "bin", "busybox"), 0o755);
  for (const applet of execFileSync("/bin/busybox", ["--list"]).toString().trim().split("\n")) {
    if (applet !== "busybox") await symlink("busybox", join(root, "bin", applet));
  }
  await writeFile(join(root, "etc", "passwd"), "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n");
  for (const [path, content] of Object.entries(files)) {
    await mkdir(join(root, path, ".."), { recursive: true });
    await writeFile(join(root, path), content);
  }
}
