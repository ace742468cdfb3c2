import { type LookupAddress, type LookupAllOptions, lookup } from "node:dns";
import { BlockList, isIP } from "node:net";
import { isLoopback } from "../registry/plain-http.js";
import { type HostPattern, hostAllowed, parseHostPattern } from "./host-pattern.js";

export interface OriginPolicyOptions {
  /** asset.fetch.allowedHosts */
  allowedHosts: readonly string[];
  /** asset.fetch.allowHttp */
  allowHttp: boolean;
  /** asset.fetch.allowPrivateAddresses */
  allowPrivateAddresses: boolean;
}

/** A download the policy refuses; the message says why and which key would allow it. */
export class OriginRefused extends Error {}

/** Addresses a name must never lead to (only an IP literal or "localhost" the operator listed reaches them). */
const LOCAL = new BlockList();
LOCAL.addSubnet("127.0.0.0", 8, "ipv4");
LOCAL.addSubnet("0.0.0.0", 8, "ipv4");
LOCAL.addAddress("::1", "ipv6");
LOCAL.addAddress("::", "ipv6");

/** Addresses of private networks (and link-local, where cloud metadata services live): names reach them only when allowed. */
const PRIVATE = new BlockList();
for (const [net, bits] of [
  ["10.0.0.0", 8],
  ["172.16.0.0", 12],
  ["192.168.0.0", 16],
  ["169.254.0.0", 16],
  ["100.64.0.0", 10],
  ["198.18.0.0", 15],
  ["224.0.0.0", 4],
  ["240.0.0.0", 4],
] as const) {
  PRIVATE.addSubnet(net, bits, "ipv4");
}
for (const [net, bits] of [
  ["fc00::", 7],
  ["fe80::", 10],
  ["ff00::", 8],
  ["64:ff9b::", 96],
] as const) {
  PRIVATE.addSubnet(net, bits, "ipv6");
}

type AddressKind = "local" | "private" | "public";

function addressKind(address: string): AddressKind {
  // An IPv4 address written as IPv6 (::ffff:127.0.0.1) is the IPv4 address.
  const mapped = /^::ffff:([0-9.]+)$/i.exec(address)?.[1];
  const plain = mapped ?? address;
  const family = isIP(plain) === 6 ? "ipv6" : "ipv4";
  if (LOCAL.check(plain, family)) return "local";
  if (PRIVATE.check(plain, family)) return "private";
  return "public";
}

type LookupCallback = (err: NodeJS.ErrnoException | null, address: string | LookupAddress[], family?: number) => void;

/**
 * Which origins FetchBlob may download from. Every URL, the first and each
 * redirect target, must match `allowedHosts` with its port, use https (or
 * plain http to loopback, or anywhere when `allowHttp`), and carry no
 * credentials. A host given by name is then resolved here, and the
 * connection goes to the address checked: a name that resolves to the
 * farm's own loopback or an unspecified address is refused (only the IP
 * literal, or "localhost", listed by the operator reaches those), and one
 * that resolves to a private or link-local network is refused unless
 * `allowPrivateAddresses`. So an allowed name whose DNS an attacker
 * controls cannot be turned against the farm's host.
 */
export class OriginPolicy {
  private readonly patterns: readonly HostPattern[];

  constructor(private readonly options: OriginPolicyOptions) {
    this.patterns = options.allowedHosts.map(parseHostPattern);
  }

  /** Whether any download at all may happen. */
  get fetches(): boolean {
    return this.patterns.length > 0;
  }

  /** Throws OriginRefused when `url` may not be requested. */
  check(url: URL): void {
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new OriginRefused(`the scheme ${url.protocol.slice(0, -1)} is not fetched (only http and https)`);
    }
    if (url.username !== "" || url.password !== "") {
      throw new OriginRefused("a URL with credentials (user:password@) is not requested");
    }
    if (!this.fetches) {
      throw new OriginRefused("this farm downloads from no host (asset.fetch.allowedHosts is empty)");
    }
    if (!hostAllowed(this.patterns, url)) {
      throw new OriginRefused(
        `${url.host} is not in asset.fetch.allowedHosts (a host listed without a port allows only port ` +
          `${url.protocol === "https:" ? 443 : 80}; list host:port or host:*)`,
      );
    }
    if (url.protocol === "http:" && !this.options.allowHttp && !isLoopback(url.hostname)) {
      throw new OriginRefused(`plain http to ${url.host} is not allowed (asset.fetch.allowHttp is false); use https`);
    }
  }

  /**
   * The DNS lookup for connections to origins (net.connect's `lookup`
   * option; IP literals are connected to without it): resolves as usual,
   * then refuses when any address is one the name may not lead to.
   */
  readonly lookup = (hostname: string, options: LookupAllOptions | object, callback: LookupCallback): void => {
    lookup(hostname, { ...(options as object), all: true }, (err, addresses) => {
      if (err) return callback(err, []);
      const refused = addresses.find((a) => !this.addressAllowed(hostname, a.address));
      if (refused) {
        const kind = addressKind(refused.address);
        const why =
          kind === "local"
            ? "a loopback or unspecified address (only an IP literal or localhost listed in asset.fetch.allowedHosts reaches those)"
            : "a private or link-local address (asset.fetch.allowPrivateAddresses is false)";
        return callback(new OriginRefused(`${hostname} resolves to ${refused.address}, ${why}`), []);
      }
      if ((options as LookupAllOptions).all) return callback(null, addresses);
      const first = addresses[0] as LookupAddress;
      callback(null, first.address, first.family);
    });
  };

  /**
   * The addresses a connection to `url` may go to: undefined for an IP
   * literal (the host check covered it); for a name, every address it
   * resolves to, each checked as `lookup` does (OriginRefused otherwise).
   */
  addressesFor(url: URL): Promise<string[] | undefined> {
    const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
    if (isIP(host) !== 0) return Promise.resolve(undefined);
    return new Promise((resolve, reject) => {
      this.lookup(host, { all: true }, (err, addresses) => {
        if (err) return reject(err);
        resolve((addresses as LookupAddress[]).map((a) => a.address));
      });
    });
  }

  private addressAllowed(hostname: string, address: string): boolean {
    switch (addressKind(address)) {
      case "public":
        return true;
      case "private":
        return this.options.allowPrivateAddresses;
      case "local":
        return hostname.toLowerCase() === "localhost";
    }
  }
}
