/** One challenge of a `WWW-Authenticate` header (RFC 9110 §11.6.1): a scheme and its parameters. */
export interface Challenge {
  /** Lowercase: `basic`, `bearer`, … */
  readonly scheme: string;
  /** Parameter names are lowercase; values are unquoted. */
  readonly params: Readonly<Record<string, string>>;
}

const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+/;

/**
 * Parses every challenge of a header such as
 * `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
 * Several challenges may share one header, separated by commas like parameters
 * are, so a new challenge is recognised by a token not followed by `=`.
 */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const challenges: { scheme: string; params: Record<string, string> }[] = [];
  let rest = header.trim();
  while (rest.length > 0) {
    rest = rest.replace(/^[\s,]+/, "");
    const name = TOKEN.exec(rest)?.[0];
    if (name === undefined) break;
    const afterName = rest.slice(name.length);
    const isParam = /^\s*=/.test(afterName) && challenges.length > 0;
    if (!isParam) {
      challenges.push({ scheme: name.toLowerCase(), params: {} });
      rest = afterName;
      continue;
    }
    rest = afterName.replace(/^\s*=\s*/, "");
    let value: string;
    if (rest.startsWith('"')) {
      const parsed = readQuoted(rest);
      value = parsed.value;
      rest = parsed.rest;
    } else {
      value = TOKEN.exec(rest)?.[0] ?? "";
      rest = rest.slice(value.length);
    }
    const current = challenges[challenges.length - 1];
    if (current) current.params[name.toLowerCase()] = value;
  }
  return challenges;
}

function readQuoted(text: string): { value: string; rest: string } {
  let value = "";
  let i = 1;
  while (i < text.length && text[i] !== '"') {
    if (text[i] === "\\" && i + 1 < text.length) i++;
    value += text[i];
    i++;
  }
  return { value, rest: text.slice(i + 1) };
}
