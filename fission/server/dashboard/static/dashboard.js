// fission dashboard: live fragments (server-sent events), countdowns, the theme, and runs.
// No build step and no dependency: one ES module, served as it is.

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

// -- theme: follows prefers-color-scheme until the toggle picks one (kept in localStorage) --
const root = document.documentElement;
const savedTheme = localStorage.getItem("fission-theme");
if (savedTheme) root.dataset.theme = savedTheme;
document.getElementById("theme-toggle")?.addEventListener("click", () => {
  const dark = root.dataset.theme
    ? root.dataset.theme === "dark"
    : matchMedia("(prefers-color-scheme: dark)").matches;
  root.dataset.theme = dark ? "light" : "dark";
  localStorage.setItem("fission-theme", root.dataset.theme);
});

// -- times: created-at stamps and ttl countdowns (epoch seconds in data attributes) --------
function duration(seconds) {
  if (seconds <= 0) return "expired";
  const s = Math.floor(seconds % 60), m = Math.floor(seconds / 60) % 60, h = Math.floor(seconds / 3600);
  return h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
}
function refreshTimes() {
  const now = Date.now() / 1000;
  for (const el of document.querySelectorAll("[data-expires]")) {
    el.textContent = duration(Number(el.dataset.expires) - now);
  }
  for (const el of document.querySelectorAll("[data-time]")) {
    if (!el.textContent) el.textContent = new Date(Number(el.dataset.time) * 1000).toLocaleString();
  }
}
refreshTimes();
setInterval(refreshTimes, 1000);

// -- live fragments: the server sends a region's new HTML whenever it changes --------------
for (const region of document.querySelectorAll("[data-live]")) {
  const source = new EventSource(region.dataset.live);
  source.addEventListener("fragment", (event) => {
    region.innerHTML = event.data;
    region.dataset.updated = String(Date.now());
    refreshTimes();
  });
  source.addEventListener("logout", () => { source.close(); location.assign(`${location.pathname.split("/ui")[0]}/ui/login`); });
  source.addEventListener("gone", (event) => {
    source.close();
    const note = document.createElement("p");
    note.className = "error";
    note.id = "gone";
    note.textContent = event.data;
    region.prepend(note);
  });
}

// -- destructive forms ask first ---------------------------------------------------------
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!confirm(form.dataset.confirm)) event.preventDefault();
  });
}

// -- a run: POST the code, read the server-sent events of its output as they arrive --------
const runForm = document.getElementById("run-form");
if (runForm) {
  const output = document.getElementById("run-output");
  const status = document.getElementById("run-status");
  const button = document.getElementById("run");
  const show = (stream, text) => {
    const span = document.createElement("span");
    span.className = stream;
    span.textContent = text;
    output.append(span);
    output.scrollTop = output.scrollHeight;
  };
  const handle = (name, data) => {
    const line = JSON.parse(data);
    if (name === "output") show(line.stream, line.data ?? atob(line.data_b64 ?? ""));
    else if (name === "result") status.textContent = `finished: exit ${line.exit_code ?? "?"}${line.timed_out ? " (timed out)" : ""}`;
    else if (name === "error") { show("stderr", `${line.message}\n`); status.textContent = `error: ${line.code}`; }
  };
  runForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    output.textContent = "";
    status.textContent = "running…";
    button.disabled = true;
    try {
      const response = await fetch(runForm.dataset.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "text/event-stream" },
        body: JSON.stringify({ code: document.getElementById("run-code").value }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        status.textContent = `refused (${response.status}): ${body?.error?.message ?? response.statusText}`;
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let name = "message", data = "";
          for (const row of block.split("\n")) {
            if (row.startsWith("event: ")) name = row.slice(7);
            else if (row.startsWith("data: ")) data += row.slice(6);
          }
          if (data) handle(name, data);
        }
      }
      if (status.textContent === "running…") status.textContent = "finished";
    } catch (error) {
      status.textContent = `failed: ${error}`;
    } finally {
      button.disabled = false;
    }
  });
}
