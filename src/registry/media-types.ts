/** Media types of the OCI image spec and Docker's image manifest v2 schema 2. */
export const MediaType = {
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerManifestList: "application/vnd.docker.distribution.manifest.list.v2+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  dockerConfig: "application/vnd.docker.container.image.v1+json",
  ociLayerTar: "application/vnd.oci.image.layer.v1.tar",
  ociLayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  ociLayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  dockerLayerGzip: "application/vnd.docker.image.rootfs.diff.tar.gzip",
} as const;

/**
 * Sent with every manifest request. A Docker registry that is not told it may
 * answer with schema 2 or OCI converts the manifest to the obsolete schema 1.
 */
export const MANIFEST_ACCEPT = [
  MediaType.ociManifest,
  MediaType.ociIndex,
  MediaType.dockerManifest,
  MediaType.dockerManifestList,
].join(", ");

export type ManifestKind = "image" | "index";

/** Whether a manifest media type is a single image or a per-platform index; undefined for others. */
export function manifestKind(mediaType: string): ManifestKind | undefined {
  switch (mediaType) {
    case MediaType.ociManifest:
    case MediaType.dockerManifest:
      return "image";
    case MediaType.ociIndex:
    case MediaType.dockerManifestList:
      return "index";
    default:
      return undefined;
  }
}

export function isConfigMediaType(mediaType: string): boolean {
  return mediaType === MediaType.ociConfig || mediaType === MediaType.dockerConfig;
}

export type LayerCompression = "none" | "gzip" | "zstd";

/** Whether Berth can unpack layers of a media type: their compression, or why not. */
export type LayerSupport = { ok: true; compression: LayerCompression } | { ok: false; reason: string };

/** How a layer is compressed, or why Berth cannot use it (foreign, non-distributable, unknown). */
export function layerSupport(mediaType: string): LayerSupport {
  switch (mediaType) {
    case MediaType.ociLayerTar:
      return { ok: true, compression: "none" };
    case MediaType.ociLayerGzip:
    case MediaType.dockerLayerGzip:
      return { ok: true, compression: "gzip" };
    case MediaType.ociLayerZstd:
      return { ok: true, compression: "zstd" };
  }
  if (mediaType.includes(".foreign.") || mediaType.includes(".nondistributable.")) {
    return {
      ok: false,
      reason: `layer media type ${mediaType} is a foreign (non-distributable) layer, which is fetched from URLs outside the registry; Berth only pulls layers stored in the registry`,
    };
  }
  return {
    ok: false,
    reason: `layer media type "${mediaType}" is not supported; Berth supports ${[MediaType.ociLayerTar, MediaType.ociLayerGzip, MediaType.ociLayerZstd, MediaType.dockerLayerGzip].join(", ")}`,
  };
}

/** The media type without parameters (`; charset=utf-8`) and in lowercase, as HTTP allows either. */
export function essence(contentType: string | null): string {
  return (contentType ?? "").split(";")[0]?.trim().toLowerCase() ?? "";
}
