package ssefeed

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// maxIDLength is the longest id written to a stream. Longer ids are replaced
// by generated ones because browsers and proxies may not send them back.
const maxIDLength = 128

// Event is one server-sent event before encoding.
type Event struct {
	// ID is written as the `id:` field. Empty means no id field.
	ID string
	// Type is written as the `event:` field. Empty means the default "message".
	Type string
	// Data is the event's payload. It is split into `data:` lines on LF, CR
	// and CRLF; invalid UTF-8 becomes U+FFFD.
	Data string
}

// validID reports whether id can be written to a stream and sent back by a
// client unchanged in a Last-Event-ID header: UTF-8, at most maxIDLength
// bytes, no control character (HTTP servers refuse a header with one), no
// white space at either end (browsers and HTTP stacks trim header values,
// and a white-space-only id comes back empty), and no U+FFFD, which is what
// invalid UTF-8 from upstream became, so two different ids could be written
// as one.
func validID(id string) bool {
	if len(id) == 0 || len(id) > maxIDLength || !utf8.ValidString(id) ||
		strings.TrimSpace(id) != id || strings.ContainsRune(id, utf8.RuneError) {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < ' ' || id[i] == 0x7f {
			return false
		}
	}
	return true
}

// validEventType reports whether name can be written as an `event:` field.
func validEventType(name string) bool {
	for i := 0; i < len(name); i++ {
		if name[i] == '\r' || name[i] == '\n' {
			return false
		}
	}
	return utf8.ValidString(name)
}

// appendEvent appends the wire form of ev to dst and returns the result. The
// caller makes sure ev.ID and ev.Type pass validID and validEventType; the
// data is made safe here.
func appendEvent(dst []byte, ev Event) []byte {
	if ev.Type != "" {
		dst = append(dst, "event: "...)
		dst = append(dst, ev.Type...)
		dst = append(dst, '\n')
	}
	if ev.ID != "" {
		dst = append(dst, "id: "...)
		dst = append(dst, ev.ID...)
		dst = append(dst, '\n')
	}
	dst = appendData(dst, ev.Data)
	return append(dst, '\n')
}

// frameID returns the id of an event that appendEvent encoded, or nil if it
// has none.
func frameID(frame []byte) []byte {
	if rest, ok := bytes.CutPrefix(frame, []byte("event: ")); ok {
		_, frame, _ = bytes.Cut(rest, []byte{'\n'})
	}
	rest, ok := bytes.CutPrefix(frame, []byte("id: "))
	if !ok {
		return nil
	}
	id, _, _ := bytes.Cut(rest, []byte{'\n'})
	return id
}

// appendData appends data as `data:` lines, one per line of the text. A lone
// CR, a lone LF and CRLF each end a line; a trailing line break yields a
// final empty `data:` line so that the client gets it back. Invalid UTF-8
// is replaced by U+FFFD.
func appendData(dst []byte, data string) []byte {
	dst = append(dst, "data: "...)
	for i := 0; i < len(data); {
		c := data[i]
		switch {
		case c == '\r':
			if i+1 < len(data) && data[i+1] == '\n' {
				i++
			}
			dst = append(dst, "\ndata: "...)
			i++
		case c == '\n':
			dst = append(dst, "\ndata: "...)
			i++
		case c < utf8.RuneSelf:
			dst = append(dst, c)
			i++
		default:
			r, size := utf8.DecodeRuneInString(data[i:])
			if r == utf8.RuneError && size == 1 {
				dst = append(dst, "\uFFFD"...)
			} else {
				dst = append(dst, data[i:i+size]...)
			}
			i += size
		}
	}
	return append(dst, '\n')
}

// appendComment appends a comment line, which clients ignore.
func appendComment(dst []byte, text string) []byte {
	dst = append(dst, ": "...)
	dst = append(dst, text...)
	return append(dst, '\n')
}

// appendRetry appends a `retry:` field telling the client how long to wait
// before reconnecting.
func appendRetry(dst []byte, d time.Duration) []byte {
	dst = append(dst, "retry: "...)
	dst = strconv.AppendInt(dst, d.Milliseconds(), 10)
	return append(dst, '\n')
}

// appendReset appends the event that tells a client its last id is unknown.
// Its data is the JSON object {"last_event_id":"<id>"}, without the HTML
// escaping of json.Marshal, which would make "<" six bytes. An id longer
// than maxIDLength was never issued, so only its first maxIDLength bytes,
// cut at a UTF-8 boundary, are echoed; invalid UTF-8 in it becomes U+FFFD.
// The data is thus at most about 6×maxIDLength bytes whatever the client
// sent.
func appendReset(dst []byte, eventName, lastID string) []byte {
	if len(lastID) > maxIDLength {
		cut := maxIDLength
		// Back off over the continuation bytes of at most one rune.
		for cut > maxIDLength-(utf8.UTFMax-1) && !utf8.RuneStart(lastID[cut]) {
			cut--
		}
		lastID = lastID[:cut]
	}
	var data bytes.Buffer
	enc := json.NewEncoder(&data)
	enc.SetEscapeHTML(false)
	// Encoding a string cannot fail.
	_ = enc.Encode(struct {
		LastEventID string `json:"last_event_id"`
	}{lastID})
	data.Truncate(data.Len() - 1) // the newline that Encode ends with
	return appendEvent(dst, Event{Type: eventName, Data: data.String()})
}
