/**
 * Credentials taken out of text bound for the log. Berth's own messages never
 * quote a secret on purpose, but some quote what a client sent (an image
 * reference that does not parse, a URL), and a client may put a password in
 * those by mistake or by habit (`docker://user:password@registry/…`). The
 * client sees its own text in the answer; the log is read by others.
 */

const HIDDEN = "***";

/** A digest after `@` (`name@sha256:…`): an image reference, not the end of a URL's userinfo. */
const DIGEST_AHEAD = "(?![a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{8})";

/** `scheme://USERINFO@` (also when a message was cut short before the `@`, marked by `…`). */
const URL_USERINFO = new RegExp(`([a-z][a-z0-9+.-]*://)[^\\s"'/@]+(?:@${DIGEST_AHEAD}|…)`, "gi");
/** `USER:PASSWORD@host` without a scheme, as a registry reference written like a URL. */
const BARE_USERINFO = new RegExp(`(^|[\\s"'(=,;])[^\\s"'/@:]+:(?!//)[^\\s"'@]*@${DIGEST_AHEAD}`, "g");
/** An HTTP authorization value quoted in a message (a placeholder such as "Bearer TOKEN" is too short to be one). */
const AUTHORIZATION_VALUE = /\b(Bearer|Basic)\s+[^\s"']{8,}/gi;

/**
 * `text` with URL userinfo, `Bearer …`/`Basic …` values and each of `secrets`
 * (exact values the caller knows, such as the call's token) replaced by ***.
 */
export function redactCredentials(text: string, secrets: Iterable<string> = []): string {
  let out = text;
  for (const secret of secrets) {
    if (secret !== "") out = out.split(secret).join(HIDDEN);
  }
  return out
    .replace(URL_USERINFO, (match, scheme: string) => `${scheme}${HIDDEN}${match.endsWith("…") ? "…" : "@"}`)
    .replace(BARE_USERINFO, (_match, before: string) => `${before}${HIDDEN}@`)
    .replace(AUTHORIZATION_VALUE, (_match, scheme: string) => `${scheme} ${HIDDEN}`);
}
