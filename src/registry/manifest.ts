import { z } from "zod";
import { parseContentDigest } from "./digests.js";
import { RegistryError } from "./errors.js";
import { MediaType, manifestKind } from "./media-types.js";

const digestField = z.string().superRefine((value, ctx) => {
  const parsed = parseContentDigest(value);
  if (typeof parsed === "string") ctx.addIssue({ code: "custom", message: parsed });
});

const platformSchema = z.object({
  os: z.string(),
  architecture: z.string(),
  variant: z.string().optional(),
  "os.version": z.string().optional(),
  "os.features": z.array(z.string()).optional(),
});

const descriptorSchema = z.object({
  mediaType: z.string(),
  digest: digestField,
  size: z.number().int().nonnegative(),
  urls: z.array(z.string()).optional(),
  annotations: z.record(z.string(), z.string()).optional(),
  platform: platformSchema.optional(),
});

const imageManifestSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  config: descriptorSchema,
  layers: z.array(descriptorSchema),
  annotations: z.record(z.string(), z.string()).optional(),
});

const indexSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  manifests: z.array(descriptorSchema),
  annotations: z.record(z.string(), z.string()).optional(),
});

/** Content named by digest and size, as manifests list it. */
export type Descriptor = z.infer<typeof descriptorSchema>;
export type DescriptorPlatform = z.infer<typeof platformSchema>;
export type ImageManifest = z.infer<typeof imageManifestSchema>;
export type ImageIndex = z.infer<typeof indexSchema>;

export type ParsedManifest =
  | { readonly kind: "image"; readonly mediaType: string; readonly manifest: ImageManifest }
  | { readonly kind: "index"; readonly mediaType: string; readonly index: ImageIndex };

const SCHEMA1 = new Set([
  "application/vnd.docker.distribution.manifest.v1+json",
  "application/vnd.docker.distribution.manifest.v1+prettyjws",
]);

/**
 * Parses manifest bytes. The media type comes from the response's
 * Content-Type, or from the document's own `mediaType` when the registry
 * sent a generic type; the two must agree when both are specific.
 */
export function parseManifest(bytes: Uint8Array, contentType: string, reference: string): ParsedManifest {
  const invalid = (why: string) => new RegistryError("invalid", reference, why);
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch {
    throw invalid("the registry sent a manifest that is not valid JSON");
  }
  const declared =
    typeof json === "object" && json !== null && "mediaType" in json && typeof json.mediaType === "string"
      ? json.mediaType
      : undefined;
  const mediaType = manifestKind(contentType) ? contentType : (declared ?? contentType);
  if (SCHEMA1.has(mediaType)) {
    throw invalid(
      `the registry only has a Docker schema 1 manifest (${mediaType}), a format Berth does not support; push the image again with a current tool`,
    );
  }
  const kind = manifestKind(mediaType);
  if (kind === undefined) {
    throw invalid(
      `manifest media type "${mediaType || "(none)"}" is not supported; Berth reads ${[MediaType.ociManifest, MediaType.ociIndex, MediaType.dockerManifest, MediaType.dockerManifestList].join(", ")}`,
    );
  }
  if (declared !== undefined && declared !== mediaType) {
    throw invalid(`the manifest says its media type is ${declared} but the registry served it as ${mediaType}`);
  }
  if (kind === "image") {
    const result = imageManifestSchema.safeParse(json);
    if (!result.success) throw invalid(`malformed image manifest: ${describeIssue(result.error)}`);
    return { kind, mediaType, manifest: result.data };
  }
  const result = indexSchema.safeParse(json);
  if (!result.success) throw invalid(`malformed image index: ${describeIssue(result.error)}`);
  return { kind, mediaType, index: result.data };
}

/** The first problem zod found, with its JSON path: enough for an engineer to look at the right field. */
export function describeIssue(error: z.ZodError): string {
  const issue = error.issues[0];
  if (!issue) return "unknown problem";
  const path = issue.path.map((p) => (typeof p === "number" ? `[${p}]` : `.${String(p)}`)).join("");
  return `${path.replace(/^\./, "") || "(document)"}: ${issue.message}`;
}
