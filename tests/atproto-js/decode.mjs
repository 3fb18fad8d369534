// Decode frames with @atproto/xrpc-server's Frame.fromBytes, the parser AT
// Protocol's JavaScript tooling uses for event streams.
// stdin: JSON [{name, hex}]; stdout: JSON [{name, op, t, body} | {name, failure}].
// Byte strings come out as {"$bytes": hex}, so the caller can compare bodies.
import { Frame } from '@atproto/xrpc-server'

const plain = (value) => {
  if (value instanceof Uint8Array) return { $bytes: Buffer.from(value).toString('hex') }
  if (Array.isArray(value)) return value.map(plain)
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]))
  }
  return value
}

let input = ''
for await (const chunk of process.stdin) input += chunk
const out = JSON.parse(input).map(({ name, hex }) => {
  try {
    const frame = Frame.fromBytes(Buffer.from(hex, 'hex'))
    return { name, op: frame.op, t: frame.header.t ?? null, body: plain(frame.body) }
  } catch (err) {
    return { name, failure: String(err && err.message ? err.message : err) }
  }
})
process.stdout.write(JSON.stringify(out))
