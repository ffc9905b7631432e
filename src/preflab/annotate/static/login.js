// Log in: POST the token; the server answers with an HttpOnly cookie.
"use strict";
document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const status = document.getElementById("status");
  const token = document.getElementById("token").value.trim();
  const r = await fetch("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify({token})});
  if (!r.ok) {
    status.className = "error";
    status.textContent = "Wrong token.";
    return;
  }
  const me = await r.json();
  location.href = me.role === "admin" ? "/admin" : "/";
});
