/**
 * One entry of `asset.fetch.allowedHosts`. A host without a port allows
 * only its scheme's default port (80, 443): a server that fetches URLs for
 * its clients must not open every port of a host (the farm's own gRPC port
 * among them) because one web server on it was meant.
 */
export interface HostPattern {
  /** exact: this host; below: every name ending in "." + host (not the host itself). */
  readonly kind: "exact" | "below";
  /** As WHATWG URL writes it: lowercase, IPv4 in dotted decimal, IPv6 compressed in brackets. */
  readonly host: string;
  readonly port: number | "any" | "default";
  readonly text: string;
}

/** Parses a pattern; throws an Error whose message says what is wrong. */
export function parseHostPattern(text: string): HostPattern {
  const trimmed = text.trim().toLowerCase();
  let hostPart = trimmed;
  let portPart: string | undefined;
  const bracket = trimmed.lastIndexOf("]");
  const colon = trimmed.lastIndexOf(":");
  if (colon > bracket && (trimmed.startsWith("[") || trimmed.indexOf(":") === colon)) {
    hostPart = trimmed.slice(0, colon);
    portPart = trimmed.slice(colon + 1);
  }
  let port: HostPattern["port"] = "default";
  if (portPart === "*") port = "any";
  else if (portPart !== undefined) {
    if (!/^[0-9]{1,5}$/.test(portPart) || Number(portPart) < 1 || Number(portPart) > 65535) {
      throw new Error(`"${text}": the port must be 1-65535 or *`);
    }
    port = Number(portPart);
  }
  const below = hostPart.startsWith("*.");
  const name = below ? hostPart.slice(2) : hostPart;
  if (name === "" || /[/?#@\s*]/.test(name)) {
    throw new Error(`"${text}" is not a host pattern; write host, host:port, host:* or *.domain[:port]`);
  }
  let host: string;
  try {
    host = new URL(`http://${name}/`).hostname;
  } catch {
    throw new Error(`"${text}": "${name}" is not a host name or IP address`);
  }
  if (below && (host.startsWith("[") || /^[0-9.]+$/.test(host))) {
    throw new Error(`"${text}": *. applies to names, not to IP addresses`);
  }
  return { kind: below ? "below" : "exact", host, port, text };
}

const DEFAULT_PORTS: Record<string, number> = { "http:": 80, "https:": 443 };

/** Whether `url` (already parsed, so its host is in canonical form) is one a pattern allows. */
export function hostAllowed(patterns: readonly HostPattern[], url: URL): boolean {
  const defaultPort = DEFAULT_PORTS[url.protocol];
  const port = url.port === "" ? defaultPort : Number(url.port);
  return patterns.some((p) => {
    const hostMatches = p.kind === "exact" ? url.hostname === p.host : url.hostname.endsWith(`.${p.host}`);
    if (!hostMatches) return false;
    if (p.port === "any") return true;
    return port === (p.port === "default" ? defaultPort : p.port);
  });
}
