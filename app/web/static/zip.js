/* Zip files in the browser, with no library: list a zip's members (its central directory) for the
 * preview, and write a zip of chosen files (stored, not compressed: images are compressed already)
 * for the upload. Which files are images, which are refused and which are skipped is decided by
 * the service's own rules (GET /v1/upload-rules, from app/uploads.py), given to setRules(). */
"use strict";

const CdiZip = (() => {
  let rules = null;

  /* The service's upload rules (GET /v1/upload-rules): nothing is classified before they are set. */
  function setRules(r) {
    rules = {
      ...r,
      signatures: r.image_signatures.map((s) => ({
        format: s.format,
        bytes: s.bytes.map((b) => ({ offset: b.offset, bytes: Uint8Array.from(b.hex.match(/../g).map((h) => parseInt(h, 16))) })),
      })),
    };
  }

  function requireRules() {
    if (!rules) throw new Error("the service's upload rules are not loaded yet");
    return rules;
  }

  function suffix(name) {
    const base = name.split("/").pop();
    const dot = base.lastIndexOf(".");
    return dot > 0 ? base.slice(dot).toLowerCase() : "";
  }

  /* A member name the service refuses outright (app/uploads.py, _safe_parts). */
  function unsafe(path) {
    const name = path.replace(/\\/g, "/");
    if (name.includes("\0")) return "a NUL byte in its name";
    if (name.startsWith("/") || (name.length >= 2 && name[1] === ":")) return "an absolute path";
    if (name.split("/").some((p) => p === "..")) return "a '..' component in its path";
    return null;
  }

  /* What the service will do with a file at `path` (folders separated by "/"):
   * {kind: "image"} | {kind: "junk"} (skipped silently) | {kind: "refused", reason}. */
  function classify(path, size) {
    const r = requireRules();
    const bad = unsafe(path);
    if (bad) return { kind: "refused", reason: `an unsafe path (${bad})` };
    const parts = path.split("/").filter((p) => p && p !== ".");
    const base = parts[parts.length - 1] || "";
    if (r.junk_dirs.includes(parts[0]) || r.junk_files.includes(base) || base.startsWith(r.junk_prefix)) {
      return { kind: "junk" };
    }
    const sfx = suffix(base);
    if (r.archive_suffixes.includes(sfx)) return { kind: "refused", reason: "an archive inside the set" };
    if (!r.image_suffixes.includes(sfx)) {
      return { kind: "refused", reason: `not an image (accepted: ${r.image_suffixes.join(", ")})` };
    }
    if (size === 0) return { kind: "refused", reason: "an empty file" };
    return { kind: "image" };
  }

  /* The accepted format whose signature `head` (a file's first bytes) carries, or null. */
  function imageFormat(head) {
    const r = requireRules();
    for (const sig of r.signatures) {
      if (sig.bytes.every((b) => b.bytes.every((v, i) => head[b.offset + i] === v))) return sig.format;
    }
    return null;
  }

  /* Sort files into images, refused and skipped; names must be unique within a set. */
  function sortFiles(entries) {
    const images = [];
    const refused = [];
    let skipped = 0;
    const seen = new Map();
    for (const e of entries) {
      const c = classify(e.path, e.size);
      if (c.kind === "junk") { skipped += 1; continue; }
      if (c.kind === "refused") { refused.push({ path: e.path, reason: c.reason }); continue; }
      const base = e.path.split("/").pop();
      if (seen.has(base)) {
        refused.push({ path: e.path, reason: `another image is named ${base} (${seen.get(base)})` });
        continue;
      }
      seen.set(base, e.path);
      images.push(e);
    }
    return { images, refused, skipped };
  }

  /* Look inside the images of `sorted` (its first bytes, read by `readHead(entry)`): a file
   * whose content is no accepted image format moves to `refused`, as the service would refuse it. */
  async function sniff(sorted, readHead) {
    const formats = [...new Set(requireRules().signatures.map((s) => s.format))].join(", ");
    const images = [];
    for (const e of sorted.images) {
      let head = null;
      try { head = await readHead(e); } catch (err) { head = null; }
      if (head !== null && imageFormat(head) === null) {
        sorted.refused.push({ path: e.path, reason: `not an image: its content is none of ${formats}` });
      } else {
        images.push(e);
      }
    }
    sorted.images = images;
    return sorted;
  }

  /* The first bytes of a chosen file. */
  async function fileHead(file, n = 16) {
    return new Uint8Array(await file.slice(0, n).arrayBuffer());
  }

  /* The first bytes of a zip member listed by listZip (stored or deflated); null if unreadable here. */
  async function memberHead(file, member, n = 16) {
    const local = new DataView(await file.slice(member.offset, member.offset + 30).arrayBuffer());
    if (local.byteLength < 30 || local.getUint32(0, true) !== 0x04034b50) return null;
    const start = member.offset + 30 + local.getUint16(26, true) + local.getUint16(28, true);
    if (member.method === 0) return new Uint8Array(await file.slice(start, start + n).arrayBuffer());
    if (member.method !== 8 || typeof DecompressionStream === "undefined") return null;
    const compressed = file.slice(start, start + Math.min(member.compressed, 64 * 1024));
    const reader = compressed.stream().pipeThrough(new DecompressionStream("deflate-raw")).getReader();
    const out = [];
    let got = 0;
    try {
      while (got < n) {
        const { value, done } = await reader.read();
        if (done) break;
        out.push(value);
        got += value.length;
      }
    } catch (err) {
      if (!got) return null; // a cut-off stream: what was decompressed still counts
    } finally {
      reader.cancel().catch(() => {});
    }
    const head = new Uint8Array(got);
    let at = 0;
    for (const part of out) { head.set(part, at); at += part.length; }
    return head.slice(0, n);
  }

  // --- reading a zip's central directory ---------------------------------------------------

  async function listZip(file) {
    const tailSize = Math.min(file.size, 65557);
    const tail = new DataView(await file.slice(file.size - tailSize).arrayBuffer());
    let eocd = -1;
    for (let i = tailSize - 22; i >= 0; i -= 1) {
      if (tail.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
    }
    if (eocd < 0) throw new Error(`${file.name} is not a zip file (or it is damaged): its directory cannot be found`);
    let count = tail.getUint16(eocd + 10, true);
    let cdSize = tail.getUint32(eocd + 12, true);
    let cdOffset = tail.getUint32(eocd + 16, true);
    if (cdOffset === 0xffffffff || count === 0xffff) {
      // Zip64: the locator sits just before the end record and points at the zip64 end record.
      const loc = eocd - 20;
      if (loc < 0 || tail.getUint32(loc, true) !== 0x07064b50) throw new Error(`${file.name}: damaged zip64 directory`);
      const recOffset = Number(tail.getBigUint64(loc + 8, true));
      const rec = new DataView(await file.slice(recOffset, recOffset + 56).arrayBuffer());
      count = Number(rec.getBigUint64(32, true));
      cdSize = Number(rec.getBigUint64(40, true));
      cdOffset = Number(rec.getBigUint64(48, true));
    }
    if (cdOffset + cdSize > file.size) throw new Error(`${file.name}: the zip file is damaged (truncated?)`);
    const cd = new DataView(await file.slice(cdOffset, cdOffset + cdSize).arrayBuffer());
    const utf8 = new TextDecoder("utf-8");
    const latin = new TextDecoder("latin1");
    const out = [];
    let p = 0;
    for (let n = 0; n < count; n += 1) {
      if (p + 46 > cd.byteLength || cd.getUint32(p, true) !== 0x02014b50) {
        throw new Error(`${file.name}: the zip file is damaged (its directory is cut short)`);
      }
      const flags = cd.getUint16(p + 8, true);
      const method = cd.getUint16(p + 10, true);
      const compressed = cd.getUint32(p + 20, true);
      const offset = cd.getUint32(p + 42, true);
      let size = cd.getUint32(p + 24, true);
      const nameLen = cd.getUint16(p + 28, true);
      const extraLen = cd.getUint16(p + 30, true);
      const commentLen = cd.getUint16(p + 32, true);
      const bytes = new Uint8Array(cd.buffer, cd.byteOffset + p + 46, nameLen);
      const name = (flags & 0x800 ? utf8 : latin).decode(bytes).replace(/\\/g, "/");
      if (size === 0xffffffff) size = NaN; // zip64 sizes: the preview shows none rather than a wrong one
      if (!name.endsWith("/")) out.push({ path: name, size, encrypted: Boolean(flags & 1), method, compressed, offset });
      p += 46 + nameLen + extraLen + commentLen;
    }
    return out;
  }

  /* The members of a one-set zip as the service reads them: one common top folder (and a top
   * folder named after the set) is stripped. */
  function stripTop(entries, role) {
    const strip = (list) => {
      const tops = new Set(list.map((e) => e.path.split("/")[0]));
      if (list.length && tops.size === 1 && list.every((e) => e.path.includes("/"))) {
        return list.map((e) => ({ ...e, path: e.path.split("/").slice(1).join("/") }));
      }
      return list;
    };
    let out = strip(entries.filter((e) => classify(e.path, 1).kind !== "junk"));
    if (out.length && out.every((e) => e.path.split("/")[0] === role && e.path.includes("/"))) out = strip(out);
    return out;
  }

  // --- writing a zip ---------------------------------------------------------------------------

  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n += 1) {
      let c = n;
      for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i += 1) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  /* A zip (a Blob) of `entries` [{path, file}], stored. `progress(done, total)` after each file.
   * The files' bytes are read once for their checksums; the Blob refers to the files themselves. */
  async function writeZip(entries, progress) {
    const enc = new TextEncoder();
    const parts = [];
    const central = [];
    let offset = 0;
    let total = 0;
    for (const e of entries) total += e.file.size;
    if (entries.length >= 0xffff || total + entries.length * 200 >= 0xffffffff) {
      throw new Error("too many or too large files for one upload from the browser: use the cdi command");
    }
    for (let i = 0; i < entries.length; i += 1) {
      const { path, file } = entries[i];
      const name = enc.encode(path);
      const crc = crc32(new Uint8Array(await file.arrayBuffer()));
      const local = new DataView(new ArrayBuffer(30));
      local.setUint32(0, 0x04034b50, true);
      local.setUint16(4, 20, true);
      local.setUint16(6, 0x800, true); // UTF-8 names
      local.setUint16(8, 0, true); // stored
      local.setUint32(14, crc, true);
      local.setUint32(18, file.size, true);
      local.setUint32(22, file.size, true);
      local.setUint16(26, name.length, true);
      parts.push(local.buffer, name, file);
      const cd = new DataView(new ArrayBuffer(46));
      cd.setUint32(0, 0x02014b50, true);
      cd.setUint16(4, 20, true);
      cd.setUint16(6, 20, true);
      cd.setUint16(8, 0x800, true);
      cd.setUint32(16, crc, true);
      cd.setUint32(20, file.size, true);
      cd.setUint32(24, file.size, true);
      cd.setUint16(28, name.length, true);
      cd.setUint32(42, offset, true);
      central.push(cd.buffer, name);
      offset += 30 + name.length + file.size;
      if (progress) progress(i + 1, entries.length);
    }
    let cdSize = 0;
    for (const c of central) cdSize += c.byteLength;
    const end = new DataView(new ArrayBuffer(22));
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, entries.length, true);
    end.setUint16(10, entries.length, true);
    end.setUint32(12, cdSize, true);
    end.setUint32(16, offset, true);
    return new Blob([...parts, ...central, end.buffer], { type: "application/zip" });
  }

  return { setRules, classify, imageFormat, sortFiles, sniff, fileHead, memberHead, listZip, stripTop, writeZip,
    crc32 };
})();
