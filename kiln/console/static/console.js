// Kiln console: the few things a server-rendered page cannot do alone. No dependencies.
//  - [data-live="URL"]: text kept current from a Server-Sent Events stream (each event's data
//    is a JSON object; [data-field="name"] children show its fields).
//  - [data-confirm="question"] on a form: asks before it is sent.
//  - a[data-go]: followed at once (leaving for a payment page: the page's CSP lets forms post
//    only to the console, so a form's answer cannot redirect to another site).
"use strict";

function live(element) {
  const source = new EventSource(element.dataset.live);
  source.onmessage = (event) => {
    const data = JSON.parse(event.data);
    for (const target of element.querySelectorAll("[data-field]")) {
      const value = data[target.dataset.field];
      if (value !== undefined) target.textContent = value;
    }
    if (data.append !== undefined) {
      const line = document.createElement("div");
      line.textContent = data.append;
      element.querySelector("[data-lines]")?.append(line);
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  const go = document.querySelector("a[data-go]");
  if (go) window.location.assign(go.href);
  for (const element of document.querySelectorAll("[data-live]")) live(element);
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
