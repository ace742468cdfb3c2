import { isIP } from "node:net";

/**
 * Whether plain HTTP may be used to reach a host. Loopback is trusted
 * (nothing crosses a network); anything else must be listed as insecure by
 * the operator, because credentials and unverified redirects would otherwise
 * travel in clear text.
 */
export function plainHttpAllowed(host: string, insecureRegistries: ReadonlySet<string>): boolean {
  return (
    isLoopback(hostname(host)) || insecureRegistries.has(host.toLowerCase()) || insecureRegistries.has(hostname(host))
  );
}

/** The scheme to open a registry's API with. */
export function registryScheme(host: string, insecureRegistries: ReadonlySet<string>): "http" | "https" {
  return plainHttpAllowed(host, insecureRegistries) ? "http" : "https";
}

/** True for `localhost`, 127.0.0.0/8 and ::1. */
export function isLoopback(name: string): boolean {
  const bare = name.replace(/^\[|\]$/g, "").toLowerCase();
  if (bare === "localhost" || bare.endsWith(".localhost")) return true;
  if (isIP(bare) === 4) return bare.startsWith("127.");
  if (isIP(bare) === 6) return bare === "::1" || bare === "0:0:0:0:0:0:0:1" || bare.startsWith("::ffff:127.");
  return false;
}

/** The host name of `host[:port]` or `[v6][:port]`, lowercase, brackets kept off. */
export function hostname(host: string): string {
  const lower = host.toLowerCase();
  if (lower.startsWith("[")) return lower.slice(1, lower.indexOf("]"));
  const colon = lower.lastIndexOf(":");
  // No colon, or several without brackets (a bare IPv6 address): there is no port.
  if (colon === -1 || lower.indexOf(":") !== colon) return lower;
  return lower.slice(0, colon);
}

/** Whether a URL (a registry endpoint, a redirect target, a token realm) may be requested. */
export function urlAllowed(url: URL, insecureRegistries: ReadonlySet<string>): boolean {
  if (url.protocol === "https:") return true;
  if (url.protocol !== "http:") return false;
  return plainHttpAllowed(url.host, insecureRegistries);
}
