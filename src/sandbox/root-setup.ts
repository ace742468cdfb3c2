import type { LaunchStep } from "../process/launcher.js";
import type { SandboxLayout } from "./bwrap-args.js";
import type { WritableArea } from "./disk-usage.js";

/** What a root other than the host's needs (see action-root.ts): made once per action, before bwrap starts. */
export interface RootSetup {
  /** What the launcher mounts, as root, in the sandbox's private mount namespace before it becomes the slot's user. */
  steps: LaunchStep[];
  /** bwrap's mounts for this root. */
  layout: Pick<SandboxLayout, "root" | "hide" | "inputSource" | "inputMount">;
  /** Where the action's writes land beside its input root, for the disk bounds. */
  areas: WritableArea[];
}
