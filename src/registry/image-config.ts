import { z } from "zod";
import { RegistryError } from "./errors.js";
import { describeIssue } from "./manifest.js";

const nullableStrings = z
  .array(z.string())
  .nullish()
  .transform((v) => v ?? undefined);

const configSchema = z.object({
  os: z.string(),
  architecture: z.string(),
  variant: z.string().optional(),
  config: z
    .object({
      Env: nullableStrings,
      Cmd: nullableStrings,
      Entrypoint: nullableStrings,
      WorkingDir: z.string().optional(),
      User: z.string().optional(),
    })
    .nullish(),
  rootfs: z.object({
    type: z.literal("layers"),
    diff_ids: z.array(z.string()),
  }),
});

/** What Berth needs from an image's configuration blob to run a command in it. */
export interface ImageConfig {
  readonly os: string;
  readonly architecture: string;
  readonly variant?: string;
  /** `NAME=value` entries, in the image's order. */
  readonly env: readonly string[];
  readonly cmd?: readonly string[];
  readonly entrypoint?: readonly string[];
  /** Empty when the image sets none (the runtime then uses `/`). */
  readonly workingDir: string;
  /** Empty when the image sets none (root). */
  readonly user: string;
  /** Digests of the uncompressed layers, bottom first. */
  readonly diffIds: readonly string[];
}

/** Parses a configuration blob (`application/vnd.oci.image.config.v1+json` or Docker's equivalent). */
export function parseImageConfig(bytes: Uint8Array, reference: string): ImageConfig {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch {
    throw new RegistryError("invalid", reference, "the image configuration is not valid JSON");
  }
  const result = configSchema.safeParse(json);
  if (!result.success) {
    throw new RegistryError("invalid", reference, `malformed image configuration: ${describeIssue(result.error)}`);
  }
  const { os, architecture, variant, config, rootfs } = result.data;
  return {
    os,
    architecture,
    ...(variant ? { variant } : {}),
    env: config?.Env ?? [],
    ...(config?.Cmd ? { cmd: config.Cmd } : {}),
    ...(config?.Entrypoint ? { entrypoint: config.Entrypoint } : {}),
    workingDir: config?.WorkingDir ?? "",
    user: config?.User ?? "",
    diffIds: rootfs.diff_ids,
  };
}
